//! `refdpo stats` on small hand-made caches with answers worked out by hand, and on the demo.

use super::common::{demo_config, fails, ok, precomputed, train_with};
use refdpo::cache::{self, CacheRow};
use refdpo::stats::queries;

fn row(i: u64, c: usize, r: usize, sc: f64, sr: f64, rc: f64, rr: f64) -> CacheRow {
    CacheRow {
        prompt_id: format!("p{i}"),
        row: i,
        prompt_ids: vec![1, 2],
        chosen_ids: vec![7; c],
        rejected_ids: vec![8; r],
        ref_chosen_logps: rc,
        ref_rejected_logps: rr,
        score_chosen: Some(sc),
        score_rejected: Some(sr),
        chosen_truncated: i == 4,
        rejected_truncated: false,
    }
}

#[test]
fn hand_computed_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.parquet");
    // len_diff = [1, 0, -2, 3, 3]; ref margin = [1, -2, 0.5, 3, 2]; score diff = [4, 0, -1, 6, 4]
    let rows = vec![
        row(0, 3, 2, 8.0, 4.0, -5.0, -6.0),
        row(1, 5, 5, 7.0, 7.0, -8.0, -6.0),
        row(2, 2, 4, 5.0, 6.0, -3.0, -3.5),
        row(3, 4, 1, 9.0, 3.0, -2.0, -5.0),
        row(4, 6, 3, 6.0, 2.0, -4.0, -6.0),
    ];
    cache::parquet::write(&path, &rows, &refdpo_fp()).unwrap();
    let s = queries::compute(std::slice::from_ref(&path)).unwrap();
    let g = |k: &str| {
        s.summary[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k}: {:?}", s.summary.get(k)))
    };
    assert_eq!(s.summary["pairs"], 5);
    assert_eq!(g("chosen_tokens_mean"), 4.0);
    assert_eq!(g("rejected_tokens_mean"), 3.0);
    assert_eq!(g("chosen_longer_frac"), 0.6);
    assert_eq!(g("equal_length_frac"), 0.2);
    assert_eq!(g("ties_frac"), 0.2);
    assert_eq!(g("chosen_truncated_frac"), 0.2);
    assert_eq!(g("chosen_tokens_median"), 4.0);
    assert!((g("chosen_tokens_p10") - 2.4).abs() < 1e-12); // linear: 2 + 0.4·(3 − 2)
    assert_eq!(g("score_gap_max"), 6.0);
    // Spearman with average ranks: len_diff ranks [3, 2, 1, 4.5, 4.5], margin ranks [3, 1, 2, 5, 4].
    let rho = 8.5 / (9.5f64 * 10.0).sqrt();
    assert!(
        (g("ref_margin_len_diff_spearman") - rho).abs() < 1e-12,
        "{}",
        g("ref_margin_len_diff_spearman")
    );
    // Pearson on raw values: len_diff [1,0,-2,3,3] (mean 1), margin [1,-2,.5,3,2] (mean .9).
    let (dx, dy) = ([0.0, -1.0, -3.0, 2.0, 2.0], [0.1, -2.9, -0.4, 2.1, 1.1]);
    let sxy: f64 = dx.iter().zip(dy).map(|(a, b)| a * b).sum();
    let r = sxy
        / (dx.iter().map(|a| a * a).sum::<f64>() * dy.iter().map(|b| b * b).sum::<f64>()).sqrt();
    assert!((g("ref_margin_len_diff_pearson") - r).abs() < 1e-12);
    // Deciles over the 4 unequal pairs: |diff| [1, 2, 3, 3] → deciles [0, 2, 5, 7].
    let d: Vec<_> = s
        .deciles
        .iter()
        .map(|d| (d.decile, d.pairs, d.longer_wins))
        .collect();
    assert_eq!(d, vec![(0, 1, 1.0), (2, 1, 0.0), (5, 1, 1.0), (7, 1, 1.0)]);
    assert!(
        (g("ref_chosen_logps_per_token_mean")
            - (-5.0 / 3.0 - 8.0 / 5.0 - 1.5 - 0.5 - 4.0 / 6.0) / 5.0)
            .abs()
            < 1e-12
    );
}

fn refdpo_fp() -> refdpo::cache::Fingerprint {
    serde_json::from_value(serde_json::json!({
        "dataset_id": "d", "dataset_revision": "r", "split": "s", "limit": 0, "model_id": "m",
        "model_revision": "r", "weights_sha256": "w", "tokenizer_sha256": "t",
        "chat_template_sha256": "c", "max_length": 10, "truncation": "keep_start", "dtype": "f32",
        "refdpo_version": "0"
    }))
    .unwrap()
}

#[test]
fn stats_command_prints_tables_json_and_charts() {
    let (tmp, cfg) = precomputed("max_steps = 4");
    let cfg_s = cfg.to_str().unwrap();
    let plots = tmp.path().join("plots");
    let text = ok(
        &[
            "stats",
            "--config",
            cfg_s,
            "--plot",
            plots.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(
        text.contains("length bias") && text.contains("dropped: empty_assistant_turn"),
        "{text}"
    );
    for f in ["lengths.svg", "longer_win_rate.svg", "margin_vs_length.svg"] {
        let svg = std::fs::read_to_string(plots.join(f)).unwrap();
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{f}");
    }
    // The cache a config chooses must be of the inputs it declares, as stage two's; named with
    // --cache, it is read as it is.
    let err = fails(
        &[
            "stats",
            "--config",
            cfg_s,
            "--set",
            "tokenize.max_length=80",
        ],
        tmp.path(),
    );
    assert!(
        err.contains("stale cache") && err.contains("`max_length` is 96 in the cache but 80"),
        "{err}"
    );
    let cache_dir = tmp.path().join("cache");
    ok(
        &[
            "stats",
            "--config",
            cfg_s,
            "--set",
            "tokenize.max_length=80",
            "--cache",
            cache_dir.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let json: serde_json::Value = serde_json::from_str(&ok(
        &["stats", "--cache", cache_dir.to_str().unwrap(), "--json"],
        tmp.path(),
    ))
    .unwrap();
    for k in [
        "pairs",
        "chosen_tokens_mean",
        "rejected_tokens_mean",
        "chosen_longer_frac",
        "ties_frac",
        "ref_margin_len_diff_spearman",
    ] {
        assert!(!json[k].is_null(), "--json lacks {k}");
    }
    // a split the cache lacks names those it holds; a file and another --split is refused
    let err = fails(
        &[
            "stats",
            "--cache",
            cache_dir.to_str().unwrap(),
            "--split",
            "nope",
        ],
        tmp.path(),
    );
    assert!(
        err.contains("this cache holds test_prefs, train_prefs"),
        "{err}"
    );
    let file = cache_dir.join("train_prefs.parquet");
    let err = fails(
        &[
            "stats",
            "--cache",
            file.to_str().unwrap(),
            "--split",
            "test_prefs",
        ],
        tmp.path(),
    );
    assert!(err.contains("names another split"), "{err}");
    let arrow = cache_dir.join("train_prefs.arrow");
    let err = fails(&["stats", "--cache", arrow.to_str().unwrap()], tmp.path());
    assert!(err.contains("not a split's `.parquet`"), "{err}");
    // stage two names the splits a cache holds too, and a run without its policy says why
    let err = fails(
        &[
            "generate", "--config", cfg_s, "--split", "train", "--limit", "1",
        ],
        tmp.path(),
    );
    assert!(
        err.contains("this cache holds test_prefs, train_prefs"),
        "{err}"
    );
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let err = fails(
        &[
            "generate",
            "--config",
            cfg_s,
            "--run",
            run.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(err.contains("has no `final/` policy"), "{err}");
    // stats --run and judge --run before training: no run there yet, and the way on
    for (args, what) in [
        (
            vec!["stats", "--config", cfg_s, "--run"],
            "is not a training run",
        ),
        (
            vec!["judge", "--reward-model", "rm", "--run"],
            "is not a training run",
        ),
        (vec!["stats", "--config", cfg_s, "--run"], "does not exist"),
    ] {
        let at = if what == "does not exist" {
            tmp.path().join("nothere")
        } else {
            run.clone()
        };
        let err = fails(&[&args[..], &[at.to_str().unwrap()]].concat(), tmp.path());
        assert!(
            err.contains(what) && err.contains("train first"),
            "{args:?}: {err}"
        );
    }
    let err = fails(
        &["stats", "--cache", "cache", "--set", "train.beta=0.2"],
        tmp.path(),
    );
    assert!(err.contains("pass --config FILE with --set"), "{err}");
    std::fs::remove_dir(&run).unwrap();
    // The demo's chosen answers are longer by construction.
    assert!(json["chosen_longer_frac"].as_f64().unwrap() > 0.6);
    // --run: the trained policy's margin vs length.
    ok(&["train", "--config", cfg_s, "--quiet"], tmp.path());
    let run = tmp.path().join("run");
    let json = policy_stats(cfg_s, &run, tmp.path());
    assert!(
        json["policy"]["margin_len_diff_spearman"].is_number(),
        "{json}"
    );
    // A cache made from other inputs (another limit) is refused against the run, naming the field.
    let other = tmp.path().join("other-cache");
    let other_out = format!("precompute.out={}", other.display());
    ok(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--quiet",
            "--set",
            &other_out,
            "--set",
            "dataset.limit=40",
        ],
        tmp.path(),
    );
    let err = fails(
        &[
            "stats",
            "--cache",
            other.to_str().unwrap(),
            "--split",
            "test_prefs",
            "--run",
            run.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(
        err.contains("`limit`") && err.contains("test_prefs.parquet"),
        "{err}"
    );
}

/// Real rows: 100 UltraFeedback test rows tokenized by TRL (fixture model, max_length 512). The
/// figures of `refdpo stats` on a cache with those lengths, log-probs and scores equal Python
/// polars' (tests/fixtures/gen_stats_fixtures.py); and refdpo's own precompute of the same rows
/// gives TRL's token ids (by hash) and log-probs.
#[test]
fn stats_on_real_rows_match_python_polars() {
    let fx = super::common::read_json(
        &super::common::repo().join("tests/fixtures/stats_test_split.json"),
    );
    let kept = fx["kept"].as_array().unwrap();
    let rows: Vec<CacheRow> = kept
        .iter()
        .map(|k| {
            let n = |key: &str| k[key].as_u64().unwrap() as usize;
            CacheRow {
                prompt_id: String::new(),
                row: k["row"].as_u64().unwrap(),
                prompt_ids: vec![0; n("prompt_len")],
                chosen_ids: vec![0; n("chosen_len")],
                rejected_ids: vec![0; n("rejected_len")],
                ref_chosen_logps: k["ref_chosen_logps"].as_f64().unwrap(),
                ref_rejected_logps: k["ref_rejected_logps"].as_f64().unwrap(),
                score_chosen: k["score_chosen"].as_f64(),
                score_rejected: k["score_rejected"].as_f64(),
                chosen_truncated: k["chosen_truncated"].as_bool().unwrap(),
                rejected_truncated: k["rejected_truncated"].as_bool().unwrap(),
            }
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("test_prefs.parquet");
    cache::parquet::write(&path, &rows, &refdpo_fp()).unwrap();
    let s = queries::compute(std::slice::from_ref(&path)).unwrap();
    let expected = fx["expected"].as_object().unwrap();
    let mut checked = 0;
    for (key, want) in expected {
        let Some(want) = want.as_f64() else { continue };
        let got = s.summary.get(key).and_then(|v| v.as_f64());
        if key == "length_diff_deciles_rows" {
            assert_eq!(s.deciles.iter().map(|d| d.pairs).sum::<u64>() as f64, want);
            continue;
        }
        let got = got.unwrap_or_else(|| panic!("refdpo stats lacks `{key}`"));
        assert!(
            (got - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{key}: refdpo {got} vs polars {want}"
        );
        checked += 1;
    }
    assert!(checked >= 30, "{checked}");
    let want_deciles = expected["length_diff_deciles"].as_array().unwrap();
    assert_eq!(s.deciles.len(), want_deciles.len());
    for (d, w) in s.deciles.iter().zip(want_deciles) {
        assert_eq!(d.decile, w["decile"].as_i64().unwrap());
        assert_eq!(d.pairs, w["pairs"].as_u64().unwrap());
        assert_eq!(d.abs_diff_min, w["abs_diff_min"].as_f64().unwrap());
        assert_eq!(d.abs_diff_max, w["abs_diff_max"].as_f64().unwrap());
        assert!((d.longer_wins - w["longer_wins"].as_f64().unwrap()).abs() < 1e-12);
    }
}

/// `stats --run` of a LoRA policy that is still the reference (bf16 weights, a learning rate that
/// moves nothing): every implicit reward margin is 0 as in training's own evaluation, so no pair
/// is won, no answer favoured, and the correlation with a constant margin is undefined (null, as
/// scipy's NaN). Before, the adapter was merged into the unrounded f32 base (accuracy 0.45 on
/// noise) and a margin of 0 counted as favouring the longer answer when the chosen was shorter.
#[test]
fn stats_run_of_an_untrained_bf16_lora_policy_is_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "max_steps = 1\n[train.lora]\nr = 8\nalpha = 16");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("dtype = \"f32\"", "dtype = \"bf16\"")).unwrap();
    let cfg_s = cfg.to_str().unwrap();
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    train_with(cfg_s, tmp.path(), &["train.learning_rate=1e-30"]);
    let run = tmp.path().join("run");
    let json = policy_stats(cfg_s, &run, tmp.path());
    let p = &json["policy"];
    assert_eq!(p["margin_mean"], 0.0, "{p}");
    assert_eq!(p["reward_accuracy"], 0.0, "{p}");
    assert_eq!(p["prefers_longer_frac"], 0.0, "{p}");
    assert!(p["data_longer_chosen_frac"].as_f64().unwrap() < 1.0, "{p}");
    assert!(p["margin_len_diff_spearman"].is_null(), "{p}");
    assert!(p["margin_len_diff_pearson"].is_null(), "{p}");
}

/// `stats --json` of the test split with the run's policy.
fn policy_stats(cfg: &str, run: &std::path::Path, cwd: &std::path::Path) -> serde_json::Value {
    let args = [
        "stats",
        "--config",
        cfg,
        "--split",
        "test_prefs",
        "--run",
        run.to_str().unwrap(),
        "--json",
    ];
    serde_json::from_str(&ok(&args, cwd)).unwrap()
}
