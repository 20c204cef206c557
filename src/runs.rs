//! Reading a finished run: its configuration and its `final/` policy as a whole model, the one
//! loader `generate --run` and `stats --run` share.

use crate::config::Config;
use crate::dirs::RunDir;
use crate::error::{Error, Result};
use crate::inputs::Inputs;
use crate::model::Transformer;
use crate::train::checkpoint;
use candle_core::{DType, Device};

impl RunDir {
    /// The step of the run's `final/` policy, if it has one.
    pub fn final_step(&self) -> Option<usize> {
        checkpoint::final_step(&self.final_dir())
    }

    /// The run's resolved configuration (`config.toml`).
    pub fn load_config(&self) -> Result<Config> {
        Config::load(&self.config_file()?, &[])
    }

    /// The path of the run's `config.toml`; a folder without one is no run, said with the way on.
    pub fn config_file(&self) -> Result<std::path::PathBuf> {
        let path = self.config();
        if !path.exists() {
            let what = if self.root().is_dir() {
                "is not a training run (it has no config.toml)"
            } else {
                "does not exist"
            };
            return Err(Error::Config(format!(
                "`{}` {what}: train first (`refdpo train`, which writes it), or pass a `train.out` \
                 directory with --run",
                self.root().display()
            )));
        }
        Ok(path)
    }

    /// The run's `final/` as a whole model with its weights rounded to `dtype`, computing as
    /// the reference does on `device` (a LoRA adapter merged into the base `inputs` resolved),
    /// after checking that the run trained `cfg`'s model.
    pub fn load_policy(
        &self,
        cfg: &Config,
        inputs: &Inputs,
        dtype: DType,
        device: &Device,
    ) -> Result<Transformer> {
        let dir = self.final_dir();
        if !self.root().is_dir() {
            return Err(Error::Config(format!(
                "no run at `{}`: pass a `train.out` directory",
                self.root().display()
            )));
        }
        if !dir.is_dir() {
            if let Some(pid) = crate::outputs::DirLock::holder(self.root(), "train") {
                return Err(Error::Config(format!(
                    "run `{}` has no `final/` policy yet: `refdpo train` (pid {pid}) is training \
                     it; wait for it to end",
                    self.root().display()
                )));
            }
            return Err(Error::Config(format!(
                "run `{}` has no `final/` policy: it has not finished, or trained with \
                 `train.save_final = false`; finish it with `refdpo train --resume`",
                self.root().display()
            )));
        }
        let run_cfg = self.load_config()?;
        if (&run_cfg.model.id, &run_cfg.model.revision) != (&cfg.model.id, &cfg.model.revision) {
            return Err(Error::Config(format!(
                "run `{}` trained `{}` ({}), but the config names `{}` ({}): pass the run's own \
                 config with --config {}",
                self.root().display(),
                run_cfg.model.id,
                run_cfg.model.revision,
                cfg.model.id,
                cfg.model.revision,
                self.config().display()
            )));
        }
        let (model_cfg, tensors) = checkpoint::load_model(&dir, &inputs.model, dtype, device)?;
        // rounded to `dtype` (an adapter's base already is, and its f32 update is kept as
        // training applied it), computing as the reference does
        // ([`crate::inputs::compute_dtype`])
        let compute = crate::inputs::compute_dtype(dtype, device);
        let store = if crate::model::lora::is_adapter(&dir) {
            compute
        } else {
            dtype
        };
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(store)?.to_dtype(compute)?)))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        Transformer::new(&model_cfg, &tensors)
    }
}
