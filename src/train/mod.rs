//! Stage two: DPO-train the policy from the cached reference log-probs (memory-mapped Arrow), or
//! with `train.ref = "live"` from a reference model run every step (the baseline for comparisons).

pub mod adamw8;
pub mod backprop;
pub mod batches;
pub mod checkpoint;
pub mod curves;
pub mod fused_step;
pub mod grads;
pub mod merge;
pub mod metrics_log;
pub mod micro_batch;
pub mod moments;
pub mod optim;
pub mod policy;
pub mod quant8;
pub mod recompute;
pub mod split;
pub mod tensorboard;
pub mod trainer;

use crate::config::Config;
use crate::error::Result;
use crate::outputs::{self, DirLock, Existing};
use candle_core::Device;
pub use trainer::Trainer;

/// Runs stage two into `train.out`: a new run (another run there is refused unless `existing` is
/// `Overwrite`), or with `Resume` the run that is there. Returns a one-paragraph summary.
pub fn run(cfg: &Config, device: &Device, existing: Existing, quiet: bool) -> Result<String> {
    let out = &cfg.train.out;
    let created = !out.exists();
    let result = run_locked(cfg, device, existing, quiet);
    // a run refused before writing anything (a stale or missing cache) leaves no folder behind
    if result.is_err() && created {
        outputs::remove_if_only_locks(out);
    }
    result
}

fn run_locked(cfg: &Config, device: &Device, existing: Existing, quiet: bool) -> Result<String> {
    outputs::refuse_run_inside(&cfg.train.out)?;
    let _lock = DirLock::acquire(&cfg.train.out, "train")?;
    outputs::claim_run_dir(&cfg.train.out, existing)?;
    let mut trainer = Trainer::new(cfg, device, quiet)?;
    if existing == Existing::Resume {
        if let Some(done) = trainer.resume()? {
            return Ok(done);
        }
    }
    trainer.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `train.out` that is a model folder is refused before the run's lock is taken: the
    /// refused folder gets no lock file (fuzzer: `.refdpo-train.lock` in the model folder).
    #[test]
    fn a_refused_run_folder_gets_no_lock_file() {
        let model = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::write(model.path().join(f), "x").unwrap();
        }
        let mut cfg = Config::default();
        cfg.train.out = model.path().to_path_buf();
        let err = run(&cfg, &Device::Cpu, Existing::Refuse, true).unwrap_err();
        assert!(
            err.to_string().contains("a model or checkpoint folder"),
            "{err}"
        );
        let names: Vec<_> = std::fs::read_dir(model.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
