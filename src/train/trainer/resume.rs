//! `--resume`: the newest complete checkpoint's weights, optimizer state and data order, checked
//! against the run they continue; a run that had finished is left as it is.

use super::super::checkpoint::{self, TrainerState};
use super::schedule::{place, same_place, total_steps};
use super::Trainer;
use crate::config::TrainConfig;
use crate::dirs::RunDir;
use crate::error::{Error, Result};
use std::path::Path;

impl Trainer<'_> {
    /// Continues from the newest complete checkpoint in `train.out` (or its `final/`, when a
    /// finished run is given more steps): weights, optimizer, data order. The metrics log keeps
    /// its lines up to that step, less a final evaluation that the resumed run makes again; with
    /// nothing to continue from, the run starts over and keeps none. Returns the summary instead
    /// when the run there had finished.
    pub fn resume(&mut self) -> Result<Option<String>> {
        let out = &self.cfg.train.out;
        checkpoint::remove_unfinished(out)?;
        if let Some(done) = checkpoint::finished(out, self.state.max_steps) {
            // a `final/` whose state names more steps than its optimizer took is damaged, not
            // a run that trained them
            let last = RunDir::new(out).final_dir();
            let optimizer = RunDir::optimizer(&last);
            if optimizer.is_file() {
                let took = crate::model::weights::read_f64_scalar(&optimizer, "step")
                    .map_err(|e| damaged(&last, e.detail()))?;
                if took != Some(done.global_step as f64) {
                    return Err(damaged(
                        &last,
                        format!(
                            "its trainer_state.json says step {}, its optimizer state {}",
                            done.global_step,
                            took.map_or("no step count".into(), |s| format!("{s} steps"))
                        ),
                    ));
                }
            }
            return Ok(Some(format!(
                "nothing to resume: {} finished its {} steps (final policy and evaluation in {}); \
                 raise train.max_steps or train.epochs to train on",
                out.display(),
                done.global_step,
                RunDir::new(out).final_dir().display()
            )));
        }
        let Some((dir, saved)) = checkpoint::resumable(out)? else {
            // Steps logged by a run killed before its first checkpoint are trained again.
            self.log.truncate_after(0, true)?;
            // a warning, not progress: said under --quiet too
            crate::error::note!(
                "warning: --resume: no checkpoint in {}, starting fresh from step 0",
                out.display()
            );
            return Ok(None);
        };
        let trained_with = TrainedWith::read(&dir, &self.cfg.train.out)?;
        // said before the checkpoint is read: a changed `train.lora` is why it would not fit
        self.warn_changed_config(&dir, trained_with.text.as_deref());
        let w =
            checkpoint::load_trained(&dir, &self.device).map_err(|e| damaged(&dir, e.detail()))?;
        for (name, var) in self.policy.names.iter().zip(&self.policy.vars) {
            let saved = w.get(name).ok_or_else(|| {
                Error::Train(format!(
                    "`{}` lacks `{name}`: it was saved by a run with other settings (full \
                     fine-tuning or LoRA, `train.lora.*`, or another model). Resume with the \
                     settings that trained it (its training_config.toml), or train without \
                     --resume (with --overwrite).",
                    dir.display()
                ))
            })?;
            if saved.dims() != var.dims() {
                return Err(Error::Train(format!(
                    "`{}` holds `{name}` of shape {:?}; this run's model has {:?}: the checkpoint \
                     is damaged or from another model",
                    dir.display(),
                    saved.dims(),
                    var.dims()
                )));
            }
            var.set(&saved.to_dtype(var.dtype())?)?;
        }
        self.optim
            .load(&self.policy, &RunDir::optimizer(&dir))
            .map_err(|e| damaged(&dir, e.detail()))?;
        self.state = TrainerState {
            max_steps: self.state.max_steps,
            ..saved
        };
        self.check_resumed(&dir)?;
        if let Some(then) = &trained_with.train {
            self.warn_ends_sooner(&dir, then);
        }
        self.place_resumed(&dir, &trained_with)?;
        self.epoch_batches = self.batches_of(self.state.epoch);
        let last = self.state.global_step >= self.state.max_steps;
        self.log.truncate_after(self.state.global_step, last)?;
        if !self.quiet {
            crate::error::note!(
                "resuming from {} (step {})",
                dir.display(),
                self.state.global_step
            );
        }
        self.last_checkpoint = Some(dir);
        self.resumed_at = Some(self.state.global_step);
        Ok(None)
    }

    /// On resume: the keys set otherwise than in the settings that trained the checkpoint
    /// (`old`), said on stderr, since the resumed run is then not the one that would have run
    /// uninterrupted (a batch size, accumulation or seed also changes the data order). Not
    /// refused: transformers' Trainer resumes under changed arguments too. Lengths, logging
    /// cadence and the run's own folder are left out.
    fn warn_changed_config(&self, dir: &Path, old: Option<&str>) {
        // `train.out` is where the run was found: another spelling of it (absolute, or the
        // folder moved) is the same run
        const EXPECTED: [&str; 7] = [
            "train.out",
            "train.max_steps",
            "train.epochs",
            "train.save_every",
            "train.eval_every",
            "train.log_every",
            "train.save_final",
        ];
        let Some(old) = old else {
            return;
        };
        let changed: Vec<String> = crate::config::keys::differences(old, &self.cfg.to_toml())
            .into_iter()
            .filter(|(k, _, _)| !EXPECTED.contains(&k.as_str()))
            .map(|(k, old, new)| format!("{k} {old} -> {new}"))
            .collect();
        if !changed.is_empty() {
            crate::error::note!(
                "warning: resuming with settings other than those that trained `{}` ({}): the \
                 resumed run is not the one that would have run uninterrupted",
                dir.display(),
                changed.join(", ")
            );
        }
    }

    /// A config that ends at or before the checkpoint's step, where the settings that trained it
    /// went further (a resume without the run's `--set train.epochs=…`): nothing is left to
    /// train and `final/` is written at that step, said with the way on.
    fn warn_ends_sooner(&self, dir: &Path, then: &TrainConfig) {
        let step = self.state.global_step;
        let (total, toward) = (
            self.state.max_steps,
            total_steps(self.train.lengths.len(), then),
        );
        if step >= total && toward > total {
            crate::error::note!(
                "warning: this config ends at step {total}, where `{}` was trained toward {toward} \
                 steps: nothing is left to train, and `final/` is written at step {step}. To \
                 train on, resume with the settings that trained it (--config {})",
                dir.display(),
                RunDir::training_config(dir).display()
            );
        }
    }

    /// The loaded state against itself: the step in the checkpoint's name and the optimizer's
    /// step count. Anything else is a damaged checkpoint, refused.
    fn check_resumed(&self, dir: &Path) -> Result<()> {
        let s = &self.state;
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let last = RunDir::new(&self.cfg.train.out).final_dir();
        let named = if dir == last || dir == last.with_extension("old") {
            Some(s.global_step as u64) // `final/` holds whatever step the run ended on
        } else {
            RunDir::checkpoint_step(name.strip_suffix(".old").unwrap_or(name))
        };
        let why = if named != Some(s.global_step as u64) {
            format!("its trainer_state.json says step {}", s.global_step)
        } else if self.optim.step != s.global_step as u64 {
            format!(
                "its optimizer state counts {} steps, its trainer_state.json {}",
                self.optim.step, s.global_step
            )
        } else {
            return Ok(());
        };
        Err(damaged(dir, why))
    }

    /// The checkpoint's place in the data (epoch, micro-batch) must be the one its steps reach
    /// under the batch size and accumulation that trained it; else the checkpoint is damaged,
    /// refused. Under another batch size or accumulation the run goes on from the place its steps
    /// reach under this run's, as transformers' Trainer resumes (epochs done and the steps into
    /// the next, from the global step). A checkpoint saved without its own settings may have
    /// been trained under this run's or the run's `config.toml`'s: either place is its.
    fn place_resumed(&mut self, dir: &Path, then: &TrainedWith) -> Result<()> {
        let t = &self.cfg.train;
        let now = (t.batch_size, t.grad_accum);
        let mut layouts: Vec<(usize, usize)> = then
            .train
            .iter()
            .map(|c| (c.batch_size, c.grad_accum))
            .collect();
        if !then.own {
            layouts.insert(0, now);
        }
        let pairs = self.train.lengths.len();
        let s = &mut self.state;
        let reached = |(batch_size, grad_accum): (usize, usize)| {
            let batches = pairs.div_ceil(batch_size);
            let want = place(s.global_step, batches, grad_accum);
            (want, batches, grad_accum)
        };
        let Some(&layout) = layouts.iter().find(|&&l| {
            let (want, batches, _) = reached(l);
            same_place((s.epoch, s.batch_in_epoch), want, batches)
        }) else {
            let (want, batches, grad_accum) = reached(layouts[0]);
            return Err(damaged(
                dir,
                format!(
                    "its trainer_state.json puts step {} at epoch {}, micro-batch {}, where {} \
                     steps of {grad_accum} micro-batches over epochs of {batches} end at epoch \
                     {}, micro-batch {}",
                    s.global_step, s.epoch, s.batch_in_epoch, s.global_step, want.0, want.1
                ),
            ));
        };
        if layout != now {
            (s.epoch, s.batch_in_epoch) = reached(now).0;
        }
        Ok(())
    }
}

/// The settings that trained a checkpoint, as far as the run's files say.
struct TrainedWith {
    /// Their TOML, for the changed-settings warning.
    text: Option<String>,
    train: Option<TrainConfig>,
    /// Whether they are the checkpoint's own (`training_config.toml`), not the run's
    /// `config.toml`, which a later start rewrites.
    own: bool,
}

impl TrainedWith {
    /// Checkpoint `dir`'s `training_config.toml` (one that does not read as a config is a
    /// damaged checkpoint), else the run's `config.toml` (a checkpoint saved before checkpoints
    /// kept their own), else nothing.
    fn read(dir: &Path, out: &Path) -> Result<Self> {
        let own = RunDir::training_config(dir);
        let parse = |path: &Path, text: &str| -> Result<TrainConfig> {
            let table = text
                .parse::<toml::Table>()
                .map_err(|e| Error::Config(format!("not TOML: {e}")))?;
            Ok(crate::config::Config::from_table(table, &path.display().to_string())?.train)
        };
        if own.exists() {
            let text = crate::error::fs::read_to_string(&own).map_err(|e| damaged(dir, e))?;
            let train = parse(&own, &text).map_err(|e| {
                damaged(
                    dir,
                    format!("its training_config.toml does not read: {}", e.detail()),
                )
            })?;
            return Ok(Self {
                text: Some(text),
                train: Some(train),
                own: true,
            });
        }
        let path = RunDir::new(out).config();
        let text = crate::error::fs::read_to_string(&path).ok();
        let train = text.as_deref().and_then(|t| parse(&path, t).ok());
        Ok(Self {
            text,
            train,
            own: false,
        })
    }
}

/// A checkpoint that cannot be resumed from, with the way on: one of its files is damaged (a
/// weights file's own advice is for a downloaded model, not a run's checkpoint).
fn damaged(dir: &Path, why: impl std::fmt::Display) -> Error {
    let why = why.to_string().replace(crate::model::weights::REFETCH, "");
    Error::Train(format!(
        "checkpoint `{}` is damaged: {why}. Delete it to resume from an earlier checkpoint, or \
         train without --resume (with --overwrite).",
        dir.display()
    ))
}
