//! `refdpo judge` on the demo: the hand-set reward model scores as its formula says and agrees
//! with every demo pair; the command's figures follow from its own per-prompt lines; bad input
//! (no policy, a causal LM, foreign generations, a damaged line) is refused by name.

use super::common::{copy_dir, demo_config, fails, ok, precomputed, read_json, refdpo, train_with};
use candle_core::{DType, Device};
use refdpo::config::{Config, Truncation};
use refdpo::data::{self, demo, DataSource};
use refdpo::judge::score::{Answer, Reader};
use refdpo::model::reward::RewardModel;
use refdpo::tokenize::PairTokenizer;
use serde_json::Value;
use std::path::Path;

/// The demo reward model against the formula its module states, on every test pair of the
/// demo, and its preference for each chosen answer.
#[test]
fn the_demo_reward_model_scores_its_formula_and_prefers_every_chosen_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config::load(&demo_config(tmp.path(), ""), &[]).unwrap();
    data::demo::ensure(&cfg.demo).unwrap();
    let rm_dir = tmp.path().join("demo/reward_model");
    let model = RewardModel::load(&rm_dir, DType::F32, &Device::Cpu).unwrap();
    let reader = Reader {
        tokenizer: PairTokenizer::from_dir(&rm_dir, 512, Truncation::KeepStart).unwrap(),
        max_positions: model.max_positions,
    };
    let source = DataSource::resolve(&cfg.dataset, &["test_prefs"]).unwrap();
    let read = data::read_split(&source, "test_prefs", 0).unwrap();
    let polarity = demo::reward_polarity();
    let (mut pairs, mut worst) = (0, 0f64);
    for row in &read.rows {
        let (Ok(c), Ok(r)) = (
            reader.ids(row, Answer::Chosen),
            reader.ids(row, Answer::Rejected),
        ) else {
            continue; // the demo's malformed rows
        };
        let got = model.score(&[&c, &r], 2).unwrap();
        for (ids, g) in [&c, &r].into_iter().zip(&got) {
            worst = worst.max((g - demo::reward::formula(ids, &polarity)).abs());
        }
        assert!(got[0] > got[1], "row {}: {got:?}", row.row);
        pairs += 1;
    }
    assert!(pairs >= 60, "{pairs} pairs");
    assert!(worst < 1e-5, "largest difference from the formula {worst}");
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn mean(v: &[Value], key: &str) -> f64 {
    v.iter().map(|l| l[key].as_f64().unwrap()).sum::<f64>() / v.len() as f64
}

/// Trains the demo pipeline of `cfg` and generates `limit` prompts with its policy; returns the run.
fn generate_with_policy(cfg: &str, dir: &Path, limit: &str) -> std::path::PathBuf {
    train_with(cfg, dir, &[]);
    let run = dir.join("run");
    ok(
        &[
            "generate",
            "--config",
            cfg,
            "--quiet",
            "--run",
            run.to_str().unwrap(),
            "--limit",
            limit,
            "--max-new-tokens",
            "16",
        ],
        dir,
    );
    run
}

#[test]
fn judge_scores_a_demo_run_and_its_figures_follow_from_its_lines() {
    let (tmp, cfg) = precomputed("max_steps = 12");
    let cfg_s = cfg.to_str().unwrap();
    let run = generate_with_policy(cfg_s, tmp.path(), "24");
    let run_s = run.to_str().unwrap();
    let rm = tmp.path().join("demo/reward_model");
    let rm_s = rm.to_str().unwrap();
    let plots = tmp.path().join("plots");
    let stdout = ok(
        &[
            "judge",
            "--run",
            run_s,
            "--reward-model",
            rm_s,
            "--json",
            "--plot",
            plots.to_str().unwrap(),
            "--seed",
            "3",
        ],
        tmp.path(),
    );
    let j: Value = serde_json::from_str(&stdout).unwrap();
    let per_prompt = lines(&run.join("judge-test_prefs.jsonl"));
    assert_eq!(per_prompt.len(), 24);
    assert_eq!(j["prompts"], 24);
    assert_eq!(j["reward_model_pairs"], 24);
    let generations = lines(&run.join("generations-test_prefs.jsonl"));
    for (l, g) in per_prompt.iter().zip(&generations) {
        assert_eq!(l["row"], g["row"]);
        assert_eq!(l["prompt_id"], g["prompt_id"]);
        assert_eq!(l["reference_tokens"], g["reference"]["tokens"]);
        assert_eq!(l["policy_tokens"], g["policy"]["tokens"]);
        let (p, r) = (
            l["policy_reward"].as_f64().unwrap(),
            l["reference_reward"].as_f64().unwrap(),
        );
        let want = if p > r {
            1.0
        } else if p == r {
            0.5
        } else {
            0.0
        };
        assert_eq!(l["win"].as_f64().unwrap(), want, "{l}");
        assert!(
            p.abs() < 1.0 && r.abs() < 1.0,
            "the demo model's range: {l}"
        );
    }
    let close = |key: &str, want: f64| {
        let got = j[key].as_f64().unwrap();
        assert!((got - want).abs() < 1e-12, "{key}: {got} vs {want}");
    };
    close("win_rate", mean(&per_prompt, "win"));
    close("mean_reward_policy", mean(&per_prompt, "policy_reward"));
    close(
        "mean_reward_reference",
        mean(&per_prompt, "reference_reward"),
    );
    let agree = per_prompt
        .iter()
        .filter(|l| l["chosen_reward"].as_f64() > l["rejected_reward"].as_f64())
        .count();
    close("reward_model_accuracy", agree as f64 / 24.0);
    assert_eq!(
        agree, 24,
        "the demo reward model prefers every chosen answer"
    );
    let ci = j["win_rate_ci"].as_array().unwrap();
    let (lo, hi, w) = (
        ci[0].as_f64().unwrap(),
        ci[1].as_f64().unwrap(),
        j["win_rate"].as_f64().unwrap(),
    );
    assert!(lo <= w && w <= hi, "{ci:?} around {w}");
    let lc = j["lc_win_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&lc), "{lc}");
    for f in ["judge_reward_vs_length.svg", "judge_win_rate_by_length.svg"] {
        let svg = std::fs::read_to_string(plots.join(f)).unwrap();
        assert!(svg.starts_with("<svg") || svg.contains("<svg"), "{f}");
    }
    // the same seed gives the same interval; the table names every figure
    let again: Value = serde_json::from_str(&ok(
        &[
            "judge",
            "--run",
            run_s,
            "--reward-model",
            rm_s,
            "--json",
            "--seed",
            "3",
        ],
        tmp.path(),
    ))
    .unwrap();
    assert_eq!(again["win_rate_ci"], j["win_rate_ci"]);
    let table = ok(
        &["judge", "--run", run_s, "--reward-model", rm_s, "--quiet"],
        tmp.path(),
    );
    for phrase in [
        "mean reward",
        "win rate of the policy over the reference",
        "length-controlled win rate",
        "reward model's accuracy on the pairs",
        "quintile",
    ] {
        assert!(table.contains(phrase), "{phrase}: {table}");
    }

    // A reward model of a shorter context: prompts with a longer sequence are left out of every
    // figure and counted; with none left, an error.
    let short = tmp.path().join("short_rm");
    std::fs::create_dir_all(&short).unwrap();
    for f in std::fs::read_dir(&rm).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, short.join(f.file_name().unwrap())).unwrap();
    }
    let judge_with = |positions: u64| {
        let path = short.join("config.json");
        let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        c["max_position_embeddings"] = positions.into();
        std::fs::write(&path, c.to_string()).unwrap();
        let args = [
            "judge",
            "--run",
            run_s,
            "--reward-model",
            short.to_str().unwrap(),
            "--json",
        ];
        refdpo(&args, tmp.path())
    };
    let partial = [24u64, 32, 40, 48, 64, 96, 128].into_iter().find_map(|n| {
        let out = judge_with(n);
        let j: Value = serde_json::from_slice(&out.stdout).ok()?;
        let left_out = j["skipped_too_long"].as_u64().unwrap();
        (left_out > 0 && left_out < 24).then_some((j, left_out))
    });
    let (j, left_out) = partial.expect("a context that some prompts exceed and some do not");
    assert_eq!(j["prompts"].as_u64().unwrap() + left_out, 24);
    assert_eq!(
        lines(&run.join("judge-test_prefs.jsonl")).len() as u64,
        24 - left_out
    );
    let out = judge_with(2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("every prompt"),
        "{err}"
    );
    // the generations name the policy that wrote them: after a resume they are another
    // policy's (judge refuses, stats leaves their lengths out), and --overwrite removes them
    assert!(generations.iter().all(|g| g["policy_step"] == 12));
    train_with(cfg_s, tmp.path(), &["--resume", "train.max_steps=14"]);
    let err = fails(
        &["judge", "--run", run_s, "--reward-model", rm_s],
        tmp.path(),
    );
    assert!(
        err.contains("policy at step 12") && err.contains("step 14") && err.contains("generate"),
        "{err}"
    );
    let out = refdpo(
        &[
            "stats",
            "--config",
            cfg_s,
            "--split",
            "test_prefs",
            "--run",
            run_s,
        ],
        tmp.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("generation lengths left out"),
        "{err}"
    );
    train_with(cfg_s, tmp.path(), &["--overwrite"]);
    assert!(!run.join("generations-test_prefs.jsonl").exists());
    assert!(!run.join("judge-test_prefs.jsonl").exists());
}

#[test]
fn judge_refuses_bad_input_by_name() {
    let (tmp, cfg) = precomputed("max_steps = 2");
    let cfg_s = cfg.to_str().unwrap();
    // the reference alone (no run): nothing to judge
    ok(
        &[
            "generate",
            "--config",
            cfg_s,
            "--quiet",
            "--limit",
            "3",
            "--max-new-tokens",
            "4",
        ],
        tmp.path(),
    );
    let rm = tmp.path().join("demo/reward_model");
    let rm_s = rm.to_str().unwrap();
    // judge's error on a generations file, with the pipeline's config and the demo's judge
    let judge_fails = |generations: &Path| {
        let g = generations.to_str().unwrap();
        fails(
            &[
                "judge",
                "--generations",
                g,
                "--config",
                cfg_s,
                "--reward-model",
                rm_s,
            ],
            tmp.path(),
        )
    };
    let reference_only = tmp.path().join("cache/generations-test_prefs.jsonl");
    let g = reference_only.to_str().unwrap();
    let e = judge_fails(&reference_only);
    assert!(e.contains("no policy continuation") && e.contains(g), "{e}");

    let run = generate_with_policy(cfg_s, tmp.path(), "3");
    let run_s = run.to_str().unwrap();
    // a causal LM is not a reward model
    let lm = tmp.path().join("demo/model");
    let e = fails(
        &[
            "judge",
            "--run",
            run_s,
            "--reward-model",
            lm.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(e.contains("ForSequenceClassification"), "{e}");
    // generations of other prompts, and a damaged line
    let path = run.join("generations-test_prefs.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    first["prompt_id"] = "someone-else".into();
    let foreign = tmp.path().join("foreign.jsonl");
    std::fs::write(&foreign, format!("{first}\n")).unwrap();
    let e = judge_fails(&foreign);
    assert!(
        e.contains("prompt_id someone-else") && e.contains("line 1"),
        "{e}"
    );
    let damaged = tmp.path().join("damaged.jsonl");
    std::fs::write(
        &damaged,
        format!("{}\n{{\"row\": \"x\"\n", text.lines().next().unwrap()),
    )
    .unwrap();
    let e = judge_fails(&damaged);
    assert!(
        e.contains("line 2") && e.contains("not a line of `refdpo generate`"),
        "{e}"
    );
    // a file doubled (each prompt twice), and a token count edited
    let doubled = tmp.path().join("doubled.jsonl");
    std::fs::write(&doubled, format!("{text}{text}")).unwrap();
    let e = judge_fails(&doubled);
    assert!(e.contains("line 4") && e.contains("again"), "{e}");
    let mut edited: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    edited["policy"]["tokens"] = 1_000_000_000_000_000_000u64.into();
    let counted = tmp.path().join("counted.jsonl");
    std::fs::write(&counted, format!("{edited}\n")).unwrap();
    let e = judge_fails(&counted);
    assert!(
        e.contains("line 1") && e.contains("policy continuation counts"),
        "{e}"
    );
    // a text edited apart from its ids: the reward model would judge words the policy never
    // wrote (fuzzer: "useful " fifty times moved the mean reward from 0.53 to 0.98)
    let mut edited: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    edited["policy"]["text"] = "useful ".repeat(50).into();
    let retexted = tmp.path().join("retexted.jsonl");
    std::fs::write(&retexted, format!("{edited}\n")).unwrap();
    let e = judge_fails(&retexted);
    assert!(
        e.contains("line 1") && e.contains("policy continuation's text is not its ids decoded"),
        "{e}"
    );
    // --generations needs the config it was made with
    let e = fails(
        &["judge", "--generations", g, "--reward-model", rm_s],
        tmp.path(),
    );
    assert!(e.contains("--config"), "{e}");
    // a reward model whose tokenizer gives an id past its embedding is refused by file and
    // key, as the policy's is (fuzzer: candle's bare "index-select invalid index")
    let past = tmp.path().join("past_rm");
    copy_dir(&rm, &past);
    let vocab = read_json(&past.join("config.json"))["vocab_size"].clone();
    let mut tok = read_json(&past.join("tokenizer.json"));
    tok["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": vocab, "content": "<past>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    std::fs::write(past.join("tokenizer.json"), tok.to_string()).unwrap();
    let e = fails(
        &[
            "judge",
            "--run",
            run_s,
            "--reward-model",
            past.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(
        e.contains("largest id is")
            && e.contains("past_rm/tokenizer.json")
            && e.contains("vocab_size"),
        "{e}"
    );
}

/// A source without `prompt_id`s (TRL's own layouts; here the column mapped to one the files
/// lack): the cache and the generations carry stage one's hashes of the prompts, and judge
/// matches them (it used to refuse every line as "from another dataset").
#[test]
fn judge_takes_a_source_without_prompt_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "max_steps = 2");
    let cfg_s = cfg.to_str().unwrap();
    let no_ids = "dataset.columns.prompt_id=\"absent\"";
    ok(
        &["precompute", "--config", cfg_s, "--quiet", "--set", no_ids],
        tmp.path(),
    );
    train_with(cfg_s, tmp.path(), &[no_ids]);
    let run = tmp.path().join("run");
    let run_s = run.to_str().unwrap();
    let limit = ["--limit", "4", "--max-new-tokens", "4"];
    ok(
        &[
            &["generate", "--config", cfg_s, "--set", no_ids][..],
            &["--quiet", "--run", run_s],
            &limit,
        ]
        .concat(),
        tmp.path(),
    );
    let rm = tmp.path().join("demo/reward_model");
    let args = [
        "judge",
        "--run",
        run_s,
        "--reward-model",
        rm.to_str().unwrap(),
    ];
    ok(&args, tmp.path());
    let per_prompt = lines(&run.join("judge-test_prefs.jsonl"));
    assert_eq!(per_prompt.len(), 4);
    for l in &per_prompt {
        let id = l["prompt_id"].as_str().unwrap();
        assert!(
            id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
    }
}
