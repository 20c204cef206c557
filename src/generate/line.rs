//! One line of a generations file (`generations-<split>.jsonl`): the prompt and each model's
//! continuation. `generate` writes these and `stats --run` reads them back, through this one type.

use crate::dirs::RunDir;
use crate::error::{fs, Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What one model wrote for a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Continuation {
    pub ids: Vec<u32>,
    pub text: String,
    pub tokens: usize,
    /// False when it hit `--max-new-tokens` before an EOS.
    pub finished: bool,
}

/// One prompt of the split and its continuations (field order is the file's key order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationLine {
    pub row: u64,
    pub prompt_id: String,
    pub prompt_ids: Vec<u32>,
    pub reference: Continuation,
    /// With `--run`: the trained policy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Continuation>,
    /// The step of the run's `final/` policy that wrote `policy` (absent in files written
    /// before it was recorded): a later `--resume` or `--overwrite` makes the file stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_step: Option<usize>,
}

/// The lines of a generations file (blank lines skipped), each a [`GenerationLine`].
pub fn read_lines(path: &Path) -> Result<Vec<(usize, GenerationLine)>> {
    let text = fs::read_to_string(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let line = serde_json::from_str(l).map_err(|e| {
                Error::Config(format!(
                    "`{}` line {}: not a line of `refdpo generate` ({e})",
                    path.display(),
                    i + 1
                ))
            })?;
            Ok((i + 1, line))
        })
        .collect()
}

impl GenerationLine {
    /// The continuation of `model` (`"reference"` or `"policy"`).
    pub fn of(&self, model: &str) -> Option<&Continuation> {
        match model {
            "reference" => Some(&self.reference),
            "policy" => self.policy.as_ref(),
            _ => None,
        }
    }
}

/// Generations (`lines`, read from `path`) whose policy continuations `run`'s current `final/`
/// wrote: a `--resume` or `--overwrite` since then made them another policy's.
pub fn check_current(run: &RunDir, path: &Path, lines: &[GenerationLine]) -> Result<()> {
    let now = run.final_step();
    match lines.iter().find_map(|l| l.policy_step) {
        Some(then) if Some(then) != now => Err(Error::Config(format!(
            "`{}` holds the continuations of the policy at step {then}, but `{}` now holds \
             {}: generate them again with `refdpo generate --run {}`",
            path.display(),
            run.final_dir().display(),
            now.map_or("no policy".into(), |s| format!("the policy at step {s}")),
            run.root().display()
        ))),
        _ => Ok(()),
    }
}
