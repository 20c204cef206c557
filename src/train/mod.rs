//! Stage two: DPO-train the policy from the cached reference log-probs (memory-mapped Arrow), or
//! with `train.ref = "live"` from a reference model run every step (the baseline for comparisons).

pub mod batches;
pub mod checkpoint;
pub mod grads;
pub mod optim;
pub mod policy;

use crate::cache::{self, CacheBatch, Fingerprint, MappedCache};
use crate::config::{Config, Truncation};
use crate::dpo::{dpo_loss, LossKind, LossParams, MetricsAccumulator, PairLogps};
use crate::error::{fs, Error, Result};
use crate::logprobs::{self, SeqBatch};
use crate::model::{weights, OpMode, Transformer};
use crate::precompute::{parse_dtype, ModelSource};
use crate::progress::Progress;
use crate::tokenize::{window, PairTokenizer};
use candle_core::{DType, Device};
use checkpoint::TrainerState;
use optim::{AdamW, AdamWParams};
use policy::Policy;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A split's cache plus the per-pair sequence lengths used for bucketing.
pub struct Split {
    pub cache: MappedCache,
    pub lengths: Vec<usize>,
}

impl Split {
    fn open(dir: &Path, split: &str, expected: &Fingerprint) -> Result<Self> {
        let path = cache::arrow_path(dir, split);
        if !path.exists() {
            return Err(Error::StaleCache {
                path,
                msg: "no such cache file: run `refdpo precompute` with this config first".into(),
            });
        }
        let cache = MappedCache::open(&path)?;
        cache.fingerprint.check_compatible(expected, &path)?;
        let lengths = (0..cache.len())
            .map(|i| {
                let (b, r) = cache.locate(i);
                b.prompt_ids(r).len() + b.chosen_ids(r).len().max(b.rejected_ids(r).len())
            })
            .collect();
        Ok(Self { cache, lengths })
    }

    fn pair(&self, i: usize) -> (&CacheBatch, usize) {
        self.cache.locate(i)
    }
}

/// Everything one micro-batch needs, gathered from the cache.
struct MicroBatch {
    seqs: SeqBatch,
    ref_chosen: Vec<f64>,
    ref_rejected: Vec<f64>,
    chosen_len: Vec<f64>,
    rejected_len: Vec<f64>,
    tokens: usize,
}

struct Trainer<'a> {
    cfg: &'a Config,
    device: Device,
    policy: Policy,
    reference: Option<Transformer>,
    params: LossParams,
    max_length: usize,
    truncation: Truncation,
}

impl Trainer<'_> {
    fn micro_batch(&self, split: &Split, idx: &[usize]) -> Result<MicroBatch> {
        let pairs: Vec<_> = idx
            .iter()
            .map(|&i| {
                let (b, r) = split.pair(i);
                (b.prompt_ids(r), b.chosen_ids(r), b.rejected_ids(r))
            })
            .collect();
        let seqs = SeqBatch::pairs(&pairs, self.max_length, self.truncation, 0, &self.device)?;
        let (mut ref_chosen, mut ref_rejected) = (Vec::new(), Vec::new());
        for &i in idx {
            let (b, r) = split.pair(i);
            ref_chosen.push(b.ref_chosen(r));
            ref_rejected.push(b.ref_rejected(r));
        }
        if let Some(reference) = &self.reference {
            let sums = logprobs::score(reference, &seqs, OpMode::Fast)?;
            let n = idx.len();
            ref_chosen = sums[..n].to_vec();
            ref_rejected = sums[n..].to_vec();
        }
        // Completion tokens in each truncated sequence (TRL's normalizer for ipo / sigmoid_norm):
        // the cache stores exactly the kept completion tokens.
        let chosen_len = pairs.iter().map(|(_, c, _)| c.len() as f64).collect();
        let rejected_len = pairs.iter().map(|(_, _, r)| r.len() as f64).collect();
        let tokens = pairs
            .iter()
            .map(|(p, c, r)| {
                let (a, b) = window(p, c, self.max_length, self.truncation);
                let (d, e) = window(p, r, self.max_length, self.truncation);
                a.len() + b.len() + d.len() + e.len()
            })
            .sum();
        Ok(MicroBatch {
            seqs,
            ref_chosen,
            ref_rejected,
            chosen_len,
            rejected_len,
            tokens,
        })
    }

    fn inputs(&self, mb: &MicroBatch, sums: &[f64]) -> PairLogps {
        let n = mb.ref_chosen.len();
        PairLogps {
            policy_chosen: sums[..n].to_vec(),
            policy_rejected: sums[n..].to_vec(),
            ref_chosen: mb.ref_chosen.clone(),
            ref_rejected: mb.ref_rejected.clone(),
            chosen_len: mb.chosen_len.clone(),
            rejected_len: mb.rejected_len.clone(),
            chosen_scored_tokens: mb.seqs.counts[..n].iter().sum::<usize>() as f64,
        }
    }

    /// One micro-batch forward + backward; gradients are scaled by `scale` (1 / grad_accum).
    fn train_micro(
        &self,
        mb: &MicroBatch,
        grads: &mut grads::Grads,
        scale: f64,
        metrics: &mut MetricsAccumulator,
    ) -> Result<f64> {
        let mut loss = f64::NAN;
        let mut loss_grad = |sums: &[f64]| -> Result<Vec<f64>> {
            let x = self.inputs(mb, sums);
            let out = dpo_loss(&self.params, &x)?;
            loss = out.loss;
            metrics.add(&out, &x);
            Ok(out
                .grad_chosen
                .iter()
                .chain(&out.grad_rejected)
                .map(|g| g * scale)
                .collect())
        };
        self.policy.forward_backward(
            &mb.seqs,
            self.cfg.train.gradient_checkpointing,
            grads,
            &mut loss_grad,
        )?;
        Ok(loss)
    }

    fn evaluate(&self, split: &Split) -> Result<MetricsAccumulator> {
        let mut metrics = MetricsAccumulator::default();
        for idx in batches::eval_batches(&split.lengths, self.cfg.train.batch_size) {
            let mb = self.micro_batch(split, &idx)?;
            let sums = self.policy.score(&mb.seqs)?;
            let x = self.inputs(&mb, &sums);
            metrics.add(&dpo_loss(&self.params, &x)?, &x);
        }
        Ok(metrics)
    }
}

/// The fingerprint fields a training config must match.
fn expected_fingerprint(
    cfg: &Config,
    split: &str,
    tok: &PairTokenizer,
    model: &ModelSource,
) -> Fingerprint {
    Fingerprint {
        dataset_id: cfg.dataset.id.clone(),
        dataset_revision: cfg.dataset.revision.clone(),
        split: split.to_string(),
        limit: cfg.dataset.limit,
        model_id: cfg.model.id.clone(),
        model_revision: model.revision.clone(),
        weights_sha256: model.weights_sha256.clone(),
        tokenizer_sha256: tok.tokenizer_sha256().to_string(),
        chat_template_sha256: tok.template.sha256(),
        max_length: cfg.tokenize.max_length,
        truncation: cfg.tokenize.truncation.as_str().to_string(),
        dtype: cfg.model.dtype.clone(),
        refdpo_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

fn append_metrics(path: &Path, line: &Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io("cannot open", path, e))?;
    writeln!(f, "{line}").map_err(|e| Error::io("cannot append to", path, e))
}

/// Keeps only metrics lines up to `step` (after a resume).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step")?.as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write_atomic(path, kept.as_bytes())
}

/// Runs stage two; returns a one-paragraph summary.
pub fn run(cfg: &Config, device: &Device, resume: bool, quiet: bool) -> Result<String> {
    let t = &cfg.train;
    let model = ModelSource::resolve(cfg)?;
    let tok =
        PairTokenizer::from_dir(&model.dir, cfg.tokenize.max_length, cfg.tokenize.truncation)?;
    let cache_dir = t.cache_dir(&cfg.precompute).to_path_buf();
    let fp = |split: &str| expected_fingerprint(cfg, split, &tok, &model);
    let train = Split::open(
        &cache_dir,
        &cfg.dataset.train_split,
        &fp(&cfg.dataset.train_split),
    )?;
    let test_path = cache::arrow_path(&cache_dir, &cfg.dataset.test_split);
    let test = if test_path.exists() {
        Some(Split::open(
            &cache_dir,
            &cfg.dataset.test_split,
            &fp(&cfg.dataset.test_split),
        )?)
    } else {
        None
    };
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        parse_dtype(&cfg.model.dtype)?
    };
    let state_dtype = parse_dtype(&t.state_dtype)?; // validated: f32 or bf16
    let master = weights::load(&model.weight_files, DType::F32, device)?;
    let policy = Policy::new(&model.cfg, master, dtype, device)?;
    let reference = if t.r#ref == "live" {
        Some(model.load(dtype, device)?)
    } else {
        None
    };
    let kind = LossKind::parse(&t.loss).expect("validated");
    let trainer = Trainer {
        cfg,
        device: device.clone(),
        policy,
        reference,
        params: LossParams {
            kind,
            beta: t.beta,
            label_smoothing: t.label_smoothing,
            simpo_gamma: t.simpo_gamma,
            rpo_alpha: t.rpo_alpha,
        },
        max_length: cfg.tokenize.max_length,
        truncation: cfg.tokenize.truncation,
    };
    let mut optim = AdamW::new(
        &trainer.policy,
        AdamWParams {
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_epsilon,
            weight_decay: t.weight_decay,
        },
        state_dtype,
    )?;
    let micro_per_epoch = train.cache.len().div_ceil(t.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(t.grad_accum).max(1);
    let total = if t.max_steps > 0 {
        t.max_steps
    } else {
        t.epochs * steps_per_epoch
    };
    let out = &t.out;
    fs::create_dir_all(out)?;
    fs::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
    let metrics_path = out.join("metrics.jsonl");
    let mut state = TrainerState {
        global_step: 0,
        max_steps: total,
        epoch: 0,
        batch_in_epoch: 0,
        seed: t.seed,
    };
    if resume {
        if let Some((dir, saved)) = checkpoint::latest(out) {
            let w = weights::load(&[dir.join("model.safetensors")], DType::F32, device)?;
            for (name, var) in trainer.policy.names.iter().zip(&trainer.policy.vars) {
                var.set(
                    w.get(name).ok_or_else(|| {
                        Error::Train(format!("`{}` lacks `{name}`", dir.display()))
                    })?,
                )?;
            }
            optim.load(&trainer.policy, &dir.join("optimizer.safetensors"))?;
            state = saved;
            state.max_steps = total;
            truncate_metrics(&metrics_path, state.global_step)?;
            if !quiet {
                eprintln!(
                    "resuming from {} (step {})",
                    dir.display(),
                    state.global_step
                );
            }
        } else if !quiet {
            eprintln!(
                "--resume: no checkpoint in {}, starting fresh",
                out.display()
            );
        }
    } else if metrics_path.exists() {
        std::fs::remove_file(&metrics_path)
            .map_err(|e| Error::io("cannot remove", &metrics_path, e))?;
    }
    let progress = Progress::new(total as u64, "train", quiet);
    progress.inc(state.global_step as u64);
    let mut epoch_batches =
        batches::epoch_batches(&train.lengths, t.batch_size, t.seed, state.epoch);
    let mut last_ckpt: Option<PathBuf> = checkpoint::latest(out).map(|(p, _)| p);
    let mut last_train = MetricsAccumulator::default();
    let mut grad_bytes = 0;
    while state.global_step < total {
        let started = Instant::now();
        let mut grads = trainer.policy.zero_grads(state_dtype);
        let mut metrics = MetricsAccumulator::default();
        let mut tokens = 0;
        for _ in 0..t.grad_accum {
            if state.batch_in_epoch >= epoch_batches.len() {
                state.epoch += 1;
                state.batch_in_epoch = 0;
                epoch_batches =
                    batches::epoch_batches(&train.lengths, t.batch_size, t.seed, state.epoch);
            }
            let mb = trainer.micro_batch(&train, &epoch_batches[state.batch_in_epoch])?;
            state.batch_in_epoch += 1;
            tokens += mb.tokens;
            let loss =
                trainer.train_micro(&mb, &mut grads, 1.0 / t.grad_accum as f64, &mut metrics)?;
            if !loss.is_finite() {
                return Err(Error::Train(format!(
                    "loss is {loss} at step {}: stopping. The last good checkpoint is {}; lower \
                     train.learning_rate or check the cache for non-finite ref log-probs",
                    state.global_step + 1,
                    last_ckpt
                        .as_ref()
                        .map_or("none".into(), |p| p.display().to_string())
                )));
            }
        }
        let grad_norm = grads.norm()?;
        if !grad_norm.is_finite() {
            return Err(Error::Train(format!(
                "gradient norm is {grad_norm} at step {}: stopping; the last good checkpoint is {}",
                state.global_step + 1,
                last_ckpt
                    .as_ref()
                    .map_or("none".into(), |p| p.display().to_string())
            )));
        }
        let lr = optim::learning_rate(
            &t.lr_schedule,
            t.learning_rate,
            state.global_step,
            total,
            t.warmup_ratio,
        );
        grad_bytes = grad_bytes.max(grads.bytes());
        let coef = optim::clip_coefficient(grad_norm, t.max_grad_norm);
        optim.update(&trainer.policy, &grads, lr, coef)?;
        drop(grads);
        state.global_step += 1;
        let step = state.global_step;
        let secs = started.elapsed().as_secs_f64();
        if step.is_multiple_of(t.log_every) || step == total || step == 1 {
            let mut line = serde_json::Map::new();
            line.insert("step".into(), json!(step));
            line.insert(
                "epoch".into(),
                json!(
                    state.epoch as f64
                        + state.batch_in_epoch as f64 / epoch_batches.len().max(1) as f64
                ),
            );
            line.extend(metrics.to_json(""));
            line.insert("grad_norm".into(), json!(grad_norm));
            line.insert("learning_rate".into(), json!(lr));
            line.insert(
                "tokens_per_second".into(),
                json!(tokens as f64 / secs.max(1e-9)),
            );
            line.insert("step_seconds".into(), json!(secs));
            append_metrics(&metrics_path, &Value::Object(line))?;
        }
        progress.message(format!(
            "loss {:.4} acc {:.2}",
            metrics.get("loss"),
            metrics.get("rewards/accuracies")
        ));
        progress.inc(1);
        last_train = metrics;
        let eval_now = t.eval_every > 0 && step.is_multiple_of(t.eval_every) && step < total;
        if let (true, Some(test)) = (eval_now, &test) {
            let m = trainer.evaluate(test)?;
            let mut line = serde_json::Map::from_iter([("step".to_string(), json!(step))]);
            line.extend(m.to_json("eval/"));
            append_metrics(&metrics_path, &Value::Object(line))?;
        }
        if t.save_every > 0 && step.is_multiple_of(t.save_every) {
            let dir = out.join(format!("checkpoint-{step}"));
            checkpoint::save(&dir, &trainer.policy, &optim, &state, &model.dir)?;
            last_ckpt = Some(dir);
        }
    }
    progress.finish();
    let mut summary = format!(
        "trained {} steps; last train loss {:.4}, rewards/accuracies {:.3}",
        state.global_step,
        last_train.get("loss"),
        last_train.get("rewards/accuracies")
    );
    if let Some(test) = &test {
        let m = trainer.evaluate(test)?;
        let mut line = serde_json::Map::from_iter([("step".to_string(), json!(state.global_step))]);
        line.extend(m.to_json("eval/"));
        append_metrics(&metrics_path, &Value::Object(line))?;
        summary.push_str(&format!(
            "; eval loss {:.4}, eval/rewards/accuracies {:.3} on {} pairs",
            m.get("loss"),
            m.get("rewards/accuracies"),
            test.cache.len()
        ));
    }
    if t.save_final {
        let final_dir = out.join("final");
        checkpoint::save(&final_dir, &trainer.policy, &optim, &state, &model.dir)?;
        summary.push_str(&format!("; final policy in {}", final_dir.display()));
    } else {
        summary.push_str("; final policy not saved (train.save_final = false)");
    }
    let params = trainer.policy.num_params() as f64;
    summary.push_str(&format!(
        "; persistent training state {:.1} bytes/parameter (f32 weights 4.0, {} gradients {:.1}, \
         {} AdamW moments {:.1})",
        (params * 4.0 + (grad_bytes + optim.bytes()) as f64) / params,
        t.state_dtype,
        grad_bytes as f64 / params,
        t.state_dtype,
        optim.bytes() as f64 / params,
    ));
    Ok(summary)
}
