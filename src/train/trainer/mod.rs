//! The [`Trainer`]: setup (inputs, caches, policy, optimizer), resume, and the loop of named
//! steps — one optimizer step, its log line, evaluation, checkpoints — then the summary.

mod outputs;
mod resume;
mod schedule;

use super::batches;
use super::checkpoint::TrainerState;
use super::grads::Grads;
use super::metrics_log::{MetricsLog, StepReport};
use super::micro_batch::MicroBatch;
use super::optim::{self, AdamW, AdamWParams};
use super::policy::Policy;
use super::split::Split;
use crate::cache;
use crate::config::{Config, RefMode, ReportTo};
use crate::dirs::RunDir;
use crate::dpo::{LossMix, LossParams, Metric, MetricsAccumulator};
use crate::error::{fs, Error, Result};
use crate::inputs::{self, Inputs};
use crate::model::{lora, weights, Transformer};
use crate::progress::Progress;
use crate::signals::StopRequest;
use candle_core::Device;
use schedule::{logs_at, lora_dropout_seed, total_steps};
use std::path::PathBuf;
use std::time::Instant;

pub struct Trainer<'a> {
    cfg: &'a Config,
    device: Device,
    /// The base model's directory (its tokenizer files go into every checkpoint).
    model_dir: PathBuf,
    policy: Policy,
    reference: Option<Transformer>,
    optim: AdamW,
    loss: LossMix,
    train: Split,
    test: Option<Split>,
    state: TrainerState,
    log: MetricsLog,
    epoch_batches: Vec<Vec<usize>>,
    /// The newest checkpoint this run wrote or resumed from.
    last_checkpoint: Option<PathBuf>,
    /// The step this run resumed at, if it resumed.
    resumed_at: Option<usize>,
    last_train: MetricsAccumulator,
    /// The steps since the last training line.
    window: LogWindow,
    /// The largest gradient storage seen (for the memory summary).
    grad_bytes: usize,
    quiet: bool,
}

impl<'a> Trainer<'a> {
    /// Resolves the model, opens the caches (checked against this config) and builds the policy,
    /// the live reference if asked for, and the optimizer.
    pub fn new(cfg: &'a Config, device: &Device, quiet: bool) -> Result<Self> {
        let t = &cfg.train;
        let inputs = Inputs::resolve(cfg)?;
        let vocab = inputs.model.cfg.vocab_size;
        let cache_dir = t.cache_dir(&cfg.precompute);
        let open =
            |split: &str| Split::open(cache_dir, split, &inputs.fingerprint(cfg, split), vocab);
        let train = open(&cfg.dataset.train_split)?;
        let scored = train.cache.fingerprint.scoring;
        if scored != cache::fingerprint::SCORING {
            // not refused: a run begun on this cache may be resumed on it
            crate::error::note!(
                "warning: `{}` was scored by other numerics than this build's (stage one's \
                 version {scored}, this build {}): the policy may not start exactly as that \
                 reference. For a new run, `refdpo precompute` scores it again.",
                cache::arrow_path(cache_dir, &cfg.dataset.train_split).display(),
                cache::fingerprint::SCORING
            );
        }
        if train.is_empty() {
            return Err(Error::StaleCache {
                path: cache::arrow_path(cache_dir, &cfg.dataset.train_split),
                msg: "the training split has no pairs: stage one kept none of its rows (its \
                      summary counts the skips); check the dataset, `dataset.limit` and \
                      `tokenize.max_length`"
                    .into(),
            });
        }
        let test = if cache::shards::files(cache_dir, &cfg.dataset.test_split, "arrow")?.is_some() {
            Some(open(&cfg.dataset.test_split)?)
        } else if let Some(partial) = unfinished(cache_dir, &cfg.dataset.test_split) {
            // stage one stopped before this split was done: not a cache without one
            return Err(Error::StaleCache {
                path: partial,
                msg: format!(
                    "stage one has not finished the `{}` split (its finished chunks are here): \
                     run the same `refdpo precompute` to finish it, then train",
                    cfg.dataset.test_split
                ),
            });
        } else if let Some(parquet) =
            cache::shards::files(cache_dir, &cfg.dataset.test_split, "parquet")?
        {
            // its Parquet file says the split was scored: the Arrow file beside it is lost
            return Err(Error::StaleCache {
                path: parquet.into_iter().next().unwrap_or_default(),
                msg: format!(
                    "the `{}` split has no Arrow file beside it (removed or lost): the cache is \
                     incomplete, and training would run without its evaluation. Run the same \
                     `refdpo precompute` to write it again, then train",
                    cfg.dataset.test_split
                ),
            });
        } else if let Some(kept) = reported_pairs(cache_dir, &cfg.dataset.test_split) {
            // stage one's report counts the split's pairs: its files are lost
            return Err(Error::StaleCache {
                path: crate::dirs::CacheDir::new(cache_dir).report(Default::default()),
                msg: format!(
                    "counts {kept} pairs of the `{}` split, whose files are not in the cache \
                     (removed or lost): training would run without its evaluation. Run the \
                     same `refdpo precompute` to write them again, then train",
                    cfg.dataset.test_split
                ),
            });
        } else {
            None
        };
        // a test split of no pairs (stage one kept none of its rows) evaluates nothing; said
        // under --quiet too, as what the run measures, not progress
        let test = test.filter(|t: &Split| !t.is_empty());
        if test.is_none() {
            crate::error::note!(
                "note: the cache in {} holds no `{}` pairs: training without evaluation",
                cache_dir.display(),
                cfg.dataset.test_split
            );
        }
        if t.label_smoothing > 0.0 && t.loss.0.contains(&crate::dpo::LossKind::Sigmoid) {
            crate::error::note!(
                "warning: train.label_smoothing = {} with the `sigmoid` loss trains conservative \
                 DPO (cDPO, TRL's `sigmoid` before 1.0); TRL 1.16's `sigmoid` ignores \
                 label_smoothing: set it to 0 for TRL 1.16's numbers",
                t.label_smoothing
            );
        }
        if test.is_some() && cfg.dataset.test_split == cfg.dataset.train_split {
            crate::error::note!(
                "note: dataset.test_split is the train split (`{}`): the eval/ metrics score \
                 training pairs",
                cfg.dataset.train_split
            );
        }
        // An accelerator computes in `model.dtype` over the masters (f32, or bf16: then their
        // own compute copies); the CPU in f32 over the weights rounded to `model.dtype`, as
        // stage one scored them there, so the policy starts as the reference.
        let model_dtype = cfg.model.dtype.candle();
        let dtype = inputs::compute_dtype(model_dtype, device);
        let policy = if t.lora.enabled() {
            // the base once, in the compute dtype; fresh adapters as PEFT makes them
            let base = inputs.model.tensors(model_dtype, device)?;
            let modules = lora::target_modules(&inputs.model.cfg, &t.lora.target_modules);
            lora::check_targets_exist(&inputs.model.cfg, &t.lora.target_modules)?;
            let adapters = lora::init_adapters(&modules, t.lora.r, t.seed)?;
            Policy::with_lora(&inputs.model.cfg, base, &t.lora, adapters, dtype, device)?
        } else {
            let masters = t.master_dtype.candle();
            // On an accelerator each weight is cast to the masters' dtype on the host, one
            // tensor at a time, then uploaded: bf16 masters never exist as f32 on the device
            // (the whole model in f32 at once had been 4 bytes per parameter of transient peak).
            let master = if device.is_cpu() {
                inputs.model.tensors(model_dtype, device)?
            } else {
                weights::load(&inputs.model.weight_files, masters, device)?
            };
            Policy::new(&inputs.model.cfg, master, dtype, masters, device)?
        };
        let reference = match t.reference {
            RefMode::Live => Some(inputs.model.load(model_dtype, device)?),
            RefMode::Cached => None,
        };
        let optim = AdamW::new(
            &policy,
            AdamWParams {
                beta1: t.adam_beta1,
                beta2: t.adam_beta2,
                eps: t.adam_epsilon,
                weight_decay: t.weight_decay,
            },
            t.state_dtype.candle(),
            t.optim == crate::config::Optim::Adamw8bit,
        )?;
        let max_steps = total_steps(train.len(), t);
        Ok(Self {
            cfg,
            device: device.clone(),
            model_dir: inputs.model.dir.clone(),
            policy,
            reference,
            optim,
            loss: LossMix {
                parts: t
                    .loss
                    .0
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| (k, t.loss_weights.get(i).copied().unwrap_or(1.0)))
                    .collect(),
                params: LossParams {
                    kind: t.loss.first(),
                    beta: t.beta,
                    label_smoothing: t.label_smoothing,
                    simpo_gamma: t.simpo_gamma,
                    rpo_alpha: t.rpo_alpha,
                    discopop_tau: t.discopop_tau,
                },
            },
            epoch_batches: batches::epoch_batches(&train.lengths, t.batch_size, t.seed, 0),
            train,
            test,
            state: TrainerState {
                global_step: 0,
                max_steps,
                epoch: 0,
                batch_in_epoch: 0,
            },
            log: MetricsLog::new(
                RunDir::new(&t.out).metrics(),
                t.report_to
                    .contains(&ReportTo::Tensorboard)
                    .then(|| RunDir::new(&t.out).tensorboard()),
            ),
            last_checkpoint: None,
            resumed_at: None,
            last_train: MetricsAccumulator::default(),
            window: LogWindow::default(),
            grad_bytes: 0,
            quiet,
        })
    }

    /// Runs the remaining steps, evaluating and checkpointing as configured; returns the summary.
    /// Ctrl-C or SIGTERM ends the current step, writes a checkpoint and returns an error.
    pub fn run(mut self) -> Result<String> {
        let out = &self.cfg.train.out;
        fs::create_dir_all(out)?;
        fs::write_atomic(&RunDir::new(out).config(), self.cfg.to_toml().as_bytes())?;
        let total = self.state.max_steps;
        let stop = StopRequest::install()?;
        let progress = Progress::new(total as u64, "train", self.quiet);
        progress.inc(self.state.global_step as u64);
        while self.state.global_step < total {
            if stop.requested() {
                progress.finish();
                return Err(self.interrupted());
            }
            let report = self.step()?;
            self.state.global_step += 1;
            self.log_step(&report)?;
            progress.message(format!(
                "loss {:.4} acc {:.2}",
                report.metrics.get(Metric::Loss),
                report.metrics.get(Metric::RewardsAccuracies)
            ));
            progress.inc(1);
            self.last_train = report.metrics;
            let step = self.state.global_step;
            let t = &self.cfg.train;
            if t.eval_every > 0 && step.is_multiple_of(t.eval_every) && step < total {
                self.evaluate_and_log()?;
            }
            if t.save_every > 0 && step.is_multiple_of(t.save_every) {
                self.save(&RunDir::new(out).checkpoint(step as u64))?;
            }
        }
        progress.finish();
        self.finish()
    }

    /// After Ctrl-C / SIGTERM: a checkpoint of the last finished step (unless one is there).
    fn interrupted(&mut self) -> Error {
        let step = self.state.global_step;
        let dir = RunDir::new(&self.cfg.train.out).checkpoint(step as u64);
        let saved = if self.last_checkpoint.as_ref() == Some(&dir) {
            Ok(())
        } else {
            self.save(&dir)
        };
        Error::Interrupted(match saved {
            Ok(()) => format!(
                "stopped after step {step} of {}; checkpoint in {}: continue with `refdpo train \
                 --resume` and the same --config and --set flags (the settings it trained with \
                 are its training_config.toml)",
                self.state.max_steps,
                dir.display()
            ),
            Err(e) => format!("stopped after step {step}; writing a checkpoint failed: {e:#}"),
        })
    }

    fn batches_of(&self, epoch: usize) -> Vec<Vec<usize>> {
        let t = &self.cfg.train;
        batches::epoch_batches(&self.train.lengths, t.batch_size, t.seed, epoch)
    }

    /// The pair indices of the next micro-batch (moving to the next epoch when one is done).
    fn next_batch(&mut self) -> Vec<usize> {
        if self.state.batch_in_epoch >= self.epoch_batches.len() {
            self.state.epoch += 1;
            self.state.batch_in_epoch = 0;
            self.epoch_batches = self.batches_of(self.state.epoch);
        }
        self.state.batch_in_epoch += 1;
        self.epoch_batches[self.state.batch_in_epoch - 1].clone()
    }

    /// One optimizer step: `grad_accum` micro-batches (fewer at an epoch's end) forward +
    /// backward, clip, AdamW.
    fn step(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let t = &self.cfg.train;
        let mut grads = self.policy.zero_grads(t.state_dtype.candle());
        let mut metrics = MetricsAccumulator::default();
        let mut tokens = 0;
        // As transformers' Trainer: a step never spans two epochs. An epoch's last group takes the
        // micro-batches left in it, and each counts 1 / (the group's size).
        let left = match self.epoch_batches.len()
            - self.state.batch_in_epoch.min(self.epoch_batches.len())
        {
            0 => self.epoch_batches.len(),
            n => n,
        };
        let group = t.grad_accum.min(left);
        for micro in 0..group {
            let idx = self.next_batch();
            // LoRA dropout: fresh masks per micro-batch, the same on a resumed run
            self.policy.dropout_seed = lora_dropout_seed(t.seed, self.state.global_step, micro);
            let mb = self.micro_batch(&self.train, &idx, true)?;
            tokens += mb.tokens;
            let loss = self.train_micro(&mb, &mut grads, 1.0 / group as f64, &mut metrics)?;
            if !loss.is_finite() {
                return Err(self.diverged(&format!("loss is {loss}"), &self.divergence_hint()));
            }
        }
        let learning_rate = optim::learning_rate(
            t.lr_schedule,
            t.learning_rate,
            self.state.global_step,
            self.state.max_steps,
            t.warmup_ratio,
        );
        self.grad_bytes = self.grad_bytes.max(grads.bytes());
        let grad_norm = self
            .optim
            .step(&self.policy, &grads, learning_rate, t.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(self.diverged(
                &format!("gradient norm is {grad_norm}"),
                &self.divergence_hint(),
            ));
        }
        Ok(StepReport {
            metrics,
            grad_norm,
            learning_rate,
            tokens,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The error for a non-finite loss or gradient in the step under way: it names this run's
    /// last good checkpoint.
    /// What to change for a loss or gradient that is not finite. Before the first update the
    /// policy is the model as loaded, so the learning rate cannot be the cause: the loss's own
    /// scales are (or the weights). The norm is taken before clipping, so clipping that is on
    /// does not help.
    fn divergence_hint(&self) -> String {
        let t = &self.cfg.train;
        // 1e30 as 1e30 and 1e-37 as 1e-37, not dozens of digits
        let shown = |x: f64| match x.abs() {
            a if a >= 1e6 || (a > 0.0 && a < 1e-4) => format!("{x:e}"),
            _ => x.to_string(),
        };
        if self.state.global_step == 0 {
            // DiscoPOP divides by its temperature, a LoRA adapter's output is scaled by alpha / r
            let mut others = vec![format!("train.rpo_alpha {}", shown(t.rpo_alpha))];
            if t.loss.0.contains(&crate::dpo::LossKind::Discopop) {
                others.insert(
                    0,
                    format!("raise train.discopop_tau ({})", shown(t.discopop_tau)),
                );
            }
            if t.lora.enabled() {
                others.push(format!("train.lora.alpha {}", shown(t.lora.alpha)));
            }
            return format!(
                "no update has been made yet, so the learning rate is not the cause: lower \
                 train.beta ({}) or the loss's other scales ({}, train.loss_weights), or check \
                 the model's weights",
                shown(t.beta),
                others.join(", ")
            );
        }
        // AdamW's decoupled decay scales every weight by 1 - lr·wd per step: past 1 the weights
        // change sign and grow
        let decay = t.learning_rate * t.weight_decay;
        if decay >= 1.0 {
            return format!(
                "lower train.weight_decay ({}): with train.learning_rate ({}) it scales every \
                 weight by 1 - {} per step",
                shown(t.weight_decay),
                shown(t.learning_rate),
                shown(decay)
            );
        }
        if t.max_grad_norm > 0.0 {
            "lower train.learning_rate".into()
        } else {
            "lower train.learning_rate, or set train.max_grad_norm".into()
        }
    }

    fn diverged(&self, what: &str, hint: &str) -> Error {
        self.diverged_at(self.state.global_step + 1, what, hint)
    }

    fn diverged_at(&self, step: usize, what: &str, hint: &str) -> Error {
        let last = match (&self.last_checkpoint, self.resumed_at) {
            (None, _) => "this run has saved no checkpoint".to_string(),
            // the first step after a resume: the checkpoint itself may be what is wrong
            (Some(p), Some(at)) if step == at + 1 => format!(
                "this is the first step after resuming from {}: if the hint below is not the \
                 cause, that checkpoint may be damaged (resume from an earlier one)",
                p.display()
            ),
            (Some(p), _) => format!("this run's last good checkpoint is {}", p.display()),
        };
        Error::Train(format!(
            "{what} at step {step}: stopping; {last}. To fix: {hint}"
        ))
    }

    fn micro_batch(&self, split: &Split, idx: &[usize], live: bool) -> Result<MicroBatch> {
        let shape = (self.cfg.tokenize.max_length, self.cfg.tokenize.truncation);
        let reference = self.reference.as_ref().filter(|_| live);
        let dropout = self.policy.lora.as_ref().is_some_and(|l| l.dropout > 0.0);
        let share = crate::logprobs::shares_prompts() && !dropout;
        MicroBatch::gather(split, idx, shape, reference, share, &self.device)
    }

    /// One micro-batch forward + backward; gradients are scaled by `scale` (1 / the step's group).
    fn train_micro(
        &self,
        mb: &MicroBatch,
        grads: &mut Grads,
        scale: f64,
        metrics: &mut MetricsAccumulator,
    ) -> Result<f64> {
        let mut loss = f64::NAN;
        let mut loss_grad = |sums: &[f64]| -> Result<Vec<f64>> {
            let x = mb.pair_logps(sums);
            let out = self.loss.loss(&x)?;
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

    /// Adds the step to the logging window and, at a logging step, writes its line: as TRL, the
    /// means over every micro-batch since the last line (the loss: over every step), the last
    /// step's gradient norm and learning rate, and the window's throughput.
    fn log_step(&mut self, r: &StepReport) -> Result<()> {
        let step = self.state.global_step;
        let w = &mut self.window;
        w.metrics.merge(&r.metrics);
        w.loss += r.metrics.get(Metric::Loss);
        w.tokens += r.tokens;
        w.seconds += r.seconds;
        w.steps += 1;
        if logs_at(step, self.cfg.train.log_every, self.state.max_steps) {
            let w = std::mem::take(&mut self.window);
            let window = StepReport {
                metrics: w.metrics,
                tokens: w.tokens,
                seconds: w.seconds,
                ..*r
            };
            let loss = w.loss / w.steps as f64;
            self.log
                .append_step(step, self.epoch(), &window, w.steps, loss)?;
        }
        Ok(())
    }

    /// Epochs done, with the current one's fraction (TRL's `epoch`).
    fn epoch(&self) -> f64 {
        self.state.epoch as f64
            + self.state.batch_in_epoch as f64 / self.epoch_batches.len().max(1) as f64
    }
}

/// The optimizer steps since the last training line: their micro-batches' metrics, the sum of
/// their losses, tokens, seconds and count (a run resumed mid-window starts a new one).
#[derive(Default)]
struct LogWindow {
    metrics: MetricsAccumulator,
    loss: f64,
    tokens: usize,
    seconds: f64,
    steps: usize,
}

/// A split stage one has begun and not finished in `cache_dir`: its `.partial-<split>` folder (or
/// a shard's, `.partial-<split>.shard-<i>-of-<n>`).
fn unfinished(cache_dir: &std::path::Path, split: &str) -> Option<PathBuf> {
    let whole = crate::dirs::CacheDir::new(cache_dir).partial(split);
    let name = whole.file_name()?.to_str()?.to_string();
    let shard = format!("{name}.shard-");
    std::fs::read_dir(cache_dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            p.is_dir() && (n == name || n.starts_with(&shard))
        })
}

/// The pairs stage one's report (`report.json`) says it kept of `split`, where it kept any.
fn reported_pairs(cache_dir: &std::path::Path, split: &str) -> Option<usize> {
    let path = crate::dirs::CacheDir::new(cache_dir).report(Default::default());
    let report = cache::report::read(&path).ok()?;
    report.get(split).map(|r| r.rows_kept).filter(|&n| n > 0)
}
