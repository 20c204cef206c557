//! `--resume`: the newest complete checkpoint's weights, optimizer state and data order, checked
//! against the run they continue; a run that had finished is left as it is.

use super::super::checkpoint::{self, TrainerState};
use super::Trainer;
use crate::dirs::RunDir;
use crate::error::{Error, Result};

impl Trainer<'_> {
    /// Continues from the newest complete checkpoint in `train.out` (or its `final/`, when a
    /// finished run is given more steps): weights, optimizer, data order. The metrics log keeps
    /// its lines up to that step, less a final evaluation that the resumed run makes again; with
    /// nothing to continue from, the run starts over and keeps none. Returns the summary instead
    /// when the run there had finished.
    pub fn resume(&mut self) -> Result<Option<String>> {
        let out = &self.cfg.train.out;
        if let Some(done) = checkpoint::finished(out, self.state.max_steps) {
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
        // said before the checkpoint is read: a changed `train.lora` is why it would not fit
        self.warn_changed_config();
        let w = checkpoint::load_trained(&dir, &self.device).map_err(|e| damaged(&dir, e))?;
        for (name, var) in self.policy.names.iter().zip(&self.policy.vars) {
            let saved = w.get(name).ok_or_else(|| {
                Error::Train(format!(
                    "`{}` lacks `{name}`: it was saved by a run with other settings (full \
                     fine-tuning or LoRA, `train.lora.*`, or another model). Resume with the \
                     settings the run began with (its config.toml), or train without --resume \
                     (with --overwrite).",
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
            .map_err(|e| damaged(&dir, e))?;
        self.state = TrainerState {
            max_steps: self.state.max_steps,
            ..saved
        };
        self.epoch_batches = self.batches_of(self.state.epoch);
        self.check_resumed(&dir)?;
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
        Ok(None)
    }

    /// On resume: the keys set otherwise than when the run began (its `config.toml`), said on
    /// stderr, since the resumed run is then not the one that would have run uninterrupted (a
    /// batch size, accumulation or seed also changes the data order). Not refused: transformers'
    /// Trainer resumes under changed arguments too. Lengths, logging cadence and the run's own
    /// folder are left out.
    fn warn_changed_config(&self) {
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
        let path = RunDir::new(&self.cfg.train.out).config();
        let Ok(old) = crate::error::fs::read_to_string(&path) else {
            return;
        };
        let changed: Vec<String> = crate::config::keys::differences(&old, &self.cfg.to_toml())
            .into_iter()
            .filter(|(k, _, _)| !EXPECTED.contains(&k.as_str()))
            .map(|(k, old, new)| format!("{k} {old} -> {new}"))
            .collect();
        if !changed.is_empty() {
            crate::error::note!(
                "warning: resuming with settings other than the run began with ({}): the \
                 resumed run is not the one that would have run uninterrupted",
                changed.join(", ")
            );
        }
    }

    /// The loaded state against itself: the step in the checkpoint's name, the optimizer's step
    /// count, an epoch no later than the steps allow (each epoch ends on a step) and a place
    /// within the epoch's micro-batches. Anything else is a damaged checkpoint, refused.
    fn check_resumed(&self, dir: &std::path::Path) -> Result<()> {
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
        } else if s.epoch > s.global_step {
            format!("epoch {} after {} steps", s.epoch, s.global_step)
        } else if s.batch_in_epoch > self.epoch_batches.len() {
            format!(
                "micro-batch {} of an epoch of {}",
                s.batch_in_epoch,
                self.epoch_batches.len()
            )
        } else {
            return Ok(());
        };
        Err(damaged(dir, why))
    }
}

/// A checkpoint that cannot be resumed from, with the way on: one of its files is damaged (a
/// weights file's own advice is for a downloaded model, not a run's checkpoint).
fn damaged(dir: &std::path::Path, why: impl std::fmt::Display) -> Error {
    let why = why.to_string().replace(crate::model::weights::REFETCH, "");
    Error::Train(format!(
        "checkpoint `{}` is damaged: {why}. Delete it to resume from an earlier checkpoint, or \
         train without --resume (with --overwrite).",
        dir.display()
    ))
}
