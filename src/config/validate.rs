//! What serde cannot check: required keys, ranges, finite numbers, and values that would make a
//! run do nothing. Each error is a sentence naming one key, its value and what is allowed.

use super::choices::PROJECTIONS;
use super::{Config, Dtype, StateDtype, TargetModules};
use crate::error::{Error, Result};
use std::fmt::Display;

impl Config {
    /// Checks what serde cannot: required keys, ranges, and values that would make a run do
    /// nothing. Each error names one key, its value and the allowed range.
    pub fn validate(&self) -> Result<()> {
        if self.dataset.id.is_empty() && !self.demo.generate {
            return Err(Error::Config(
                "`dataset.id` is required: set it to a hub dataset id, a local directory or a .parquet/.jsonl/.json file.".into(),
            ));
        }
        if self.model.id.is_empty() && !self.demo.generate {
            return Err(Error::Config(
                "`model.id` is required: set it to a hub model id or a local directory.".into(),
            ));
        }
        let ts = self.dataset.test_size;
        in_range(
            "dataset.test_size",
            ts,
            ts == 0.0 || (ts.is_finite() && ts > 0.0 && (ts < 1.0 || ts.fract() == 0.0)),
            "0 (no held-out split), a fraction in (0, 1), or a whole number of rows",
        )?;
        let d = &self.dataset;
        for (key, name) in [
            ("dataset.train_split", d.train_split.as_str()),
            ("dataset.test_split", d.test_split.as_str()),
        ]
        .into_iter()
        .chain(
            d.data_files
                .keys()
                .map(|k| ("dataset.data_files", k.as_str())),
        ) {
            split_name(key, name)?;
        }
        if ts > 0.0 && d.test_split == d.train_split {
            return Err(Error::Config(format!(
                "`dataset.test_size` = {ts} holds rows of `{}` out as the test split, and \
                 `dataset.test_split` names the train split itself: the held-out rows would \
                 replace the train split's cache. Give the held-out split another name (the \
                 default is `test_prefs`), or set dataset.test_size = 0 to evaluate on the train \
                 split",
                d.train_split
            )));
        }
        for (key, dir) in [
            ("precompute.out", &self.precompute.out),
            ("train.out", &self.train.out),
        ] {
            if dir.as_os_str().is_empty() {
                return Err(Error::Config(format!(
                    "`{key}` is empty: name the folder to write into (\".\" for this one)"
                )));
            }
        }
        if same_dir(&self.train.out, &self.precompute.out)
            || same_dir(&self.train.out, self.train.cache_dir(&self.precompute))
        {
            return Err(Error::Config(format!(
                "`train.out` and `precompute.out` are one directory ({}): a run there would \
                 write over the cache's files. Give the run a directory of its own.",
                self.train.out.display()
            )));
        }
        at_least("tokenize.max_length", self.tokenize.max_length, 2)?;
        at_least("precompute.batch_size", self.precompute.batch_size, 1)?;
        at_least("precompute.chunk_pairs", self.precompute.chunk_pairs, 1)?;
        if self.demo.generate {
            if self.demo.dir.as_os_str().is_empty() {
                return Err(Error::Config(
                    "`demo.dir` is empty: name the folder to generate the demo into (the default \
                     is data/demo)"
                        .into(),
                ));
            }
            for (key, rows) in [
                ("demo.train_rows", self.demo.train_rows),
                ("demo.test_rows", self.demo.test_rows),
            ] {
                in_range(key, rows, (1..=DEMO_ROWS).contains(&rows), "1 to 1000000")?;
            }
        }
        let t = &self.train;
        at_least("train.batch_size", t.batch_size, 1)?;
        at_least("train.grad_accum", t.grad_accum, 1)?;
        at_least("train.log_every", t.log_every, 1)?;
        if t.epochs == 0 && t.max_steps == 0 {
            return Err(Error::Config(
                "`train.epochs` = 0 with `train.max_steps` = 0 trains nothing: set train.epochs \
                 to at least 1, or train.max_steps."
                    .into(),
            ));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        let unit = |x: f64| (0.0..1.0).contains(&x);
        // What the optimizer's f32 arithmetic holds: 1e-300 would be 0 there and 1e39 infinite.
        let f32_range = |x: f64| {
            x == 0.0 || (f64::from(f32::MIN_POSITIVE)..=f64::from(f32::MAX)).contains(&x.abs())
        };
        const IN_F32: &str = "a finite number > 0 within f32's range (1.2e-38 to 3.4e38; the optimizer computes in f32)";
        const LOSS_F32: &str = "a finite number > 0 within f32's range (1.2e-38 to 3.4e38; the \
                                policy's gradients are f32)";
        const LOSS_F32_OR_0: &str = "0 or a finite number > 0 within f32's range (1.2e-38 to \
                                     3.4e38; the policy's gradients are f32)";
        in_range(
            "train.beta",
            t.beta,
            positive(t.beta) && f32_range(t.beta),
            LOSS_F32,
        )?;
        in_range(
            "train.learning_rate",
            t.learning_rate,
            positive(t.learning_rate) && f32_range(t.learning_rate),
            IN_F32,
        )?;
        in_range(
            "train.label_smoothing",
            t.label_smoothing,
            (0.0..0.5).contains(&t.label_smoothing),
            "in [0, 0.5)",
        )?;
        in_range(
            "train.rpo_alpha",
            t.rpo_alpha,
            non_negative(t.rpo_alpha) && f32_range(t.rpo_alpha),
            LOSS_F32_OR_0,
        )?;
        in_range(
            "train.discopop_tau",
            t.discopop_tau,
            positive(t.discopop_tau) && f32_range(t.discopop_tau),
            LOSS_F32,
        )?;
        if t.loss.0.is_empty() {
            return Err(Error::Config(
                "`train.loss` is an empty list: name at least one loss type.".into(),
            ));
        }
        if !t.loss_weights.is_empty() && t.loss_weights.len() != t.loss.0.len() {
            return Err(Error::Config(format!(
                "`train.loss_weights` has {} weights for {} losses in `train.loss`: give one \
                 weight per loss, or none (1 each).",
                t.loss_weights.len(),
                t.loss.0.len()
            )));
        }
        if let Some(w) = t.loss_weights.iter().find(|w| !f32_range(**w)) {
            return Err(Error::Config(format!(
                "`train.loss_weights` holds {w}: weights must be 0 or finite numbers within f32's \
                 range (1.2e-38 to 3.4e38 in size; the policy's gradients are f32)."
            )));
        }
        if t.loss.0.contains(&crate::dpo::LossKind::ExoPair) && t.label_smoothing <= 0.0 {
            return Err(Error::Config(
                "`train.loss` = \"exo_pair\" needs `train.label_smoothing` > 0 (its target is \
                 [1 − ε, ε]; TRL suggests 1e-3): set train.label_smoothing = 1e-3."
                    .into(),
            ));
        }
        in_range(
            "train.simpo_gamma",
            t.simpo_gamma,
            non_negative(t.simpo_gamma) && f32_range(t.simpo_gamma),
            LOSS_F32_OR_0,
        )?;
        in_range(
            "train.warmup_ratio",
            t.warmup_ratio,
            (0.0..=1.0).contains(&t.warmup_ratio),
            "in [0, 1]",
        )?;
        in_range(
            "train.max_grad_norm",
            t.max_grad_norm,
            non_negative(t.max_grad_norm),
            "a finite number >= 0 (0 = no clipping)",
        )?;
        in_range(
            "train.weight_decay",
            t.weight_decay,
            non_negative(t.weight_decay) && f32_range(t.weight_decay),
            "a finite number >= 0 within f32's range (up to 3.4e38; the optimizer computes in f32)",
        )?;
        in_range(
            "train.adam_beta1",
            t.adam_beta1,
            unit(t.adam_beta1),
            "in [0, 1)",
        )?;
        in_range(
            "train.adam_beta2",
            t.adam_beta2,
            unit(t.adam_beta2),
            "in [0, 1)",
        )?;
        let lora = &t.lora;
        if lora.enabled() && t.master_dtype == StateDtype::Bf16 {
            return Err(Error::Config(
                "`train.master_dtype` = \"bf16\" is for full fine-tuning: LoRA trains small f32 \
                 adapters over a base already frozen in `model.dtype`. Remove the key, or set \
                 train.lora.r = 0."
                    .into(),
            ));
        }
        if t.master_dtype == StateDtype::Bf16 && self.model.dtype != Dtype::Bf16 {
            return Err(Error::Config(format!(
                "`train.master_dtype` = \"bf16\" needs `model.dtype` = \"bf16\" (it is \"{}\"): \
                 the policy's weights are rounded to bf16, so the reference must be scored from \
                 the same bf16 weights, or the policy starts away from it (the first loss is not \
                 ln 2). Set model.dtype = \"bf16\" and precompute again, or keep \
                 train.master_dtype = \"f32\".",
                self.model.dtype.as_str()
            )));
        }
        // Checked with LoRA off too (`r` = 0), as every other key: a bad value is a mistake
        // whether or not it acts yet, and the run's saved config.toml keeps it.
        // its scale alpha / r multiplies f32 adapters: 1e-300 had trained nothing, 1e39 NaN
        in_range(
            "train.lora.alpha",
            lora.alpha,
            positive(lora.alpha) && f32_range(lora.alpha),
            "a finite number > 0 within f32's range (1.2e-38 to 3.4e38; the adapters compute in f32)",
        )?;
        in_range(
            "train.lora.dropout",
            lora.dropout,
            unit(lora.dropout),
            "in [0, 1)",
        )?;
        if let TargetModules::Names(names) = &lora.target_modules {
            if names.is_empty() {
                return Err(Error::Config(
                    "`train.lora.target_modules` is an empty list: name projections \
                     (e.g. [\"q_proj\", \"v_proj\"]) or use \"all-linear\"."
                        .into(),
                ));
            }
            if let Some(bad) = names.iter().find(|n| !PROJECTIONS.contains(&n.as_str())) {
                // `--set 'train.lora.target_modules=[q_proj,v_proj]'` is no TOML list
                let quoting = match bad.starts_with('[') {
                    true => {
                        " A --set value is read as TOML: quote the names, --set \
                             'train.lora.target_modules=[\"q_proj\", \"v_proj\"]'."
                    }
                    false => "",
                };
                return Err(Error::Config(format!(
                    "`train.lora.target_modules` names `{bad}`, which is not a projection \
                     refdpo adapts; choose from {} or \"all-linear\".{quoting}",
                    PROJECTIONS.join(", ")
                )));
            }
        }
        in_range(
            "train.adam_epsilon",
            t.adam_epsilon,
            positive(t.adam_epsilon) && f32_range(t.adam_epsilon),
            IN_F32,
        )?;
        Ok(())
    }
}

/// Whether two configured directories are one: the same path once `.` components and trailing
/// separators are dropped, or (both existing) the same place on disk.
fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::path::Component;
    let plain = |p: &std::path::Path| -> std::path::PathBuf {
        p.components().filter(|c| *c != Component::CurDir).collect()
    };
    plain(a) == plain(b) || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// A split name as `datasets` allows it (`\w+(\.\w+)*`: letters, digits and `_`, in parts
/// joined by dots): it names the cache's files, so `/`, `..`, a leading dot or an empty name
/// would put them elsewhere or hide them.
fn split_name(key: &str, name: &str) -> Result<()> {
    let word =
        |part: &str| !part.is_empty() && part.chars().all(|c| c.is_alphanumeric() || c == '_');
    if name.split('.').all(word) {
        return Ok(());
    }
    Err(Error::Config(format!(
        "`{key}` names split {name:?}: a split name is letters, digits and `_`, in parts \
         joined by dots (as `datasets` allows; it names the cache's files), e.g. `train_prefs`"
    )))
}

/// The most rows a demo split may have: it is generated in memory, for trying refdpo out.
const DEMO_ROWS: usize = 1_000_000;

fn at_least(key: &str, value: usize, min: usize) -> Result<()> {
    in_range(key, value, value >= min, &format!("at least {min}"))
}

fn in_range(key: &str, value: impl Display, ok: bool, allowed: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        // 1e39 as 1e39, not forty digits
        let shown = value.to_string();
        let shown = match shown.parse::<f64>() {
            Ok(x) if shown.len() > 16 => format!("{x:e}"),
            _ => shown,
        };
        Err(Error::Config(format!(
            "`{key}` = {shown} is not allowed: it must be {allowed}."
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::super::apply_override;
    use super::*;
    use crate::config::RefMode;
    use crate::dpo::LossKind;
    use candle_core::DType;

    fn table(s: &str) -> toml::Table {
        s.parse().unwrap()
    }

    /// The minimal config with `--set` overrides applied.
    fn with(sets: &[&str]) -> Result<Config> {
        let mut t = table("[dataset]\nid='d'\n[model]\nid='m'");
        for s in sets {
            apply_override(&mut t, s)?;
        }
        Config::from_table(t, "t")
    }

    #[test]
    fn a_target_modules_string_is_all_linear_or_refused_as_peft_would_read_it() {
        let err = with(&["train.lora.target_modules='q_proj'"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.lora.target_modules") && err.contains("regular expression"),
            "{err}"
        );
        with(&["train.lora.target_modules='all-linear'"]).unwrap();
        let c = with(&["train.lora.target_modules='ALL-LINEAR'"]).unwrap();
        assert_eq!(c.train.lora.target_modules, TargetModules::AllLinear);
        with(&["train.lora.target_modules=['q_proj']"]).unwrap();
    }

    #[test]
    fn split_names_are_file_prefixes_and_the_held_out_split_has_its_own() {
        for bad in [
            "../../escaped",
            "",
            "a/b",
            ".hidden",
            "a..b",
            "x\\y",
            "tr ain",
        ] {
            let err = with(&[&format!("dataset.train_split={bad:?}")])
                .unwrap_err()
                .to_string();
            assert!(err.contains("dataset.train_split"), "{bad}: {err}");
        }
        let err = with(&["dataset.data_files={\"../x\" = \"a.jsonl\"}"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("dataset.data_files"), "{err}");
        for ok in ["train_prefs", "train.v2", "train_sft", "tëst"] {
            with(&[&format!("dataset.test_split={ok:?}")]).unwrap();
        }
        let err = with(&["dataset.test_split='train_prefs'", "dataset.test_size=0.1"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dataset.test_size") && err.contains("test_prefs"),
            "{err}"
        );
        // without a held-out split, evaluating on the train split is a choice (said as a note)
        with(&["dataset.test_split='train_prefs'"]).unwrap();
    }

    #[test]
    fn enum_errors_name_the_key_the_value_and_the_choices() {
        for (set, key, value, choice) in [
            ("train.loss=nope", "train.loss", "nope", "sigmoid_norm"),
            (
                "train.lr_schedule=step",
                "train.lr_schedule",
                "step",
                "cosine",
            ),
            ("train.ref=none", "train.ref", "none", "live"),
            ("train.state_dtype=f16", "train.state_dtype", "f16", "bf16"),
            (
                "train.optim=adamw_4bit",
                "train.optim",
                "adamw_4bit",
                "adamw_8bit",
            ),
            (
                "train.master_dtype=fp8",
                "train.master_dtype",
                "fp8",
                "bf16",
            ),
            ("model.dtype=f64", "model.dtype", "f64", "bf16"),
            (
                "tokenize.truncation=middle",
                "tokenize.truncation",
                "middle",
                "keep_end",
            ),
        ] {
            let err = with(&[set]).unwrap_err().to_string();
            for part in [key, value, choice] {
                assert!(err.contains(part), "{set}: {err}");
            }
        }
        let c = with(&[
            "train.loss=sigmoid_norm",
            "train.ref=live",
            "train.state_dtype=bf16",
            "train.master_dtype=bf16",
        ])
        .unwrap();
        assert_eq!(c.train.master_dtype, StateDtype::Bf16);
        assert_eq!(c.train.loss.first(), LossKind::SigmoidNorm);
        assert_eq!(c.train.reference, RefMode::Live);
        assert_eq!(c.train.state_dtype.candle(), DType::BF16);
        // The resolved config round-trips through its saved TOML.
        let back = Config::from_table(c.to_toml().parse().unwrap(), "saved").unwrap();
        assert_eq!(back, c);
        // A list of losses with weights, as TRL's loss_type / loss_weights; also round-trips.
        let c = with(&[
            r#"train.loss=["sigmoid", "sft"]"#,
            "train.loss_weights=[1.0, 0.5]",
        ])
        .unwrap();
        assert_eq!(c.train.loss.0, [LossKind::Sigmoid, LossKind::Sft]);
        let back = Config::from_table(c.to_toml().parse().unwrap(), "saved").unwrap();
        assert_eq!(back, c);
        let err = with(&[r#"train.loss=["sigmoid", "nope"]"#])
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.loss") && err.contains("nope"), "{err}");
        let err = with(&[
            r#"train.loss=["sigmoid", "sft"]"#,
            "train.loss_weights=[1.0]",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("train.loss_weights") && err.contains("1 weights for 2"),
            "{err}"
        );
    }

    #[test]
    fn values_that_do_nothing_or_are_not_finite_are_refused_by_key() {
        for (set, key) in [
            ("train.epochs=0", "train.epochs"),
            ("train.learning_rate=nan", "train.learning_rate"),
            ("train.learning_rate=0.0", "train.learning_rate"),
            ("train.beta=inf", "train.beta"),
            ("train.beta=-0.1", "train.beta"),
            ("train.label_smoothing=0.5", "train.label_smoothing"),
            ("train.rpo_alpha=nan", "train.rpo_alpha"),
            ("train.simpo_gamma=-1.0", "train.simpo_gamma"),
            ("train.discopop_tau=0.0", "train.discopop_tau"),
            ("train.loss=\"exo_pair\"", "train.label_smoothing"),
            ("train.warmup_ratio=1.5", "train.warmup_ratio"),
            ("train.max_grad_norm=nan", "train.max_grad_norm"),
            ("train.weight_decay=-0.01", "train.weight_decay"),
            ("train.adam_beta1=1.0", "train.adam_beta1"),
            ("train.adam_beta2=nan", "train.adam_beta2"),
            ("train.adam_epsilon=0.0", "train.adam_epsilon"),
            ("train.adam_epsilon=1e-300", "train.adam_epsilon"),
            ("train.out=\"./data/cache/default/\"", "precompute.out"),
            ("train.learning_rate=1e39", "train.learning_rate"),
            ("train.weight_decay=1e39", "train.weight_decay"),
            ("train.batch_size=0", "train.batch_size"),
            ("train.grad_accum=0", "train.grad_accum"),
            ("precompute.chunk_pairs=0", "precompute.chunk_pairs"),
            ("tokenize.max_length=1", "tokenize.max_length"),
            ("train.epochs=1.5", "train.epochs"),
        ] {
            let err = with(&[set]).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{set}: {err}");
            if set.ends_with("=1e39") || set.ends_with("=1e-300") {
                let written = set.split('=').nth(1).unwrap();
                assert!(err.contains(&format!("= {written} ")), "{set}: {err}");
            }
        }
        // the rule said is the rule checked: > 0 where 0 is refused, 0 or > 0 where it is not
        let err = with(&["train.beta=-1"]).unwrap_err().to_string();
        assert!(err.contains("a finite number > 0 within"), "{err}");
        let err = with(&["train.rpo_alpha=-1.0"]).unwrap_err().to_string();
        assert!(err.contains("0 or a finite number > 0"), "{err}");
        // max_steps alone is a run.
        with(&["train.epochs=0", "train.max_steps=3"]).unwrap();
    }

    #[test]
    fn bf16_masters_need_a_bf16_reference() {
        let err = with(&["model.dtype=f32", "train.master_dtype=bf16"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`train.master_dtype`") && err.contains("\"f32\"") && err.contains("ln 2"),
            "{err}"
        );
        with(&["model.dtype=bf16", "train.master_dtype=bf16"]).unwrap();
    }

    #[test]
    fn lora_settings_are_checked_on_and_off() {
        for (sets, key) in [
            (
                &["train.lora.r=8", "train.lora.alpha=0.0"][..],
                "train.lora.alpha",
            ),
            (
                &["train.lora.r=8", "train.lora.dropout=1.0"],
                "train.lora.dropout",
            ),
            (
                &["train.lora.r=8", "train.lora.target_modules=[]"],
                "train.lora.target_modules",
            ),
            (
                &["train.lora.r=8", "train.lora.target_modules=[\"qproj\"]"],
                "train.lora.target_modules",
            ),
            (
                &["train.lora.r=8", "train.master_dtype=\"bf16\""],
                "train.master_dtype",
            ),
        ] {
            let err = with(sets).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{sets:?}: {err}");
        }
        let c = with(&[
            "train.lora.r=8",
            "train.lora.target_modules=[\"q_proj\", \"v_proj\"]",
        ])
        .unwrap();
        assert!(c.train.lora.target_modules.includes("v_proj"));
        assert!(!c.train.lora.target_modules.includes("o_proj"));
        let c = with(&["train.lora.r=8"]).unwrap();
        assert_eq!(c.train.lora.target_modules, TargetModules::AllLinear);
        // off (r = 0): still checked
        let err = with(&["train.lora.alpha=0.0"]).unwrap_err().to_string();
        assert!(err.contains("`train.lora.alpha`"), "{err}");
        let err = with(&["train.lora.target_modules=[\"foo\"]"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`train.lora.target_modules`"), "{err}");
    }
}
