//! One line of a generations file (`generations-<split>.jsonl`): the prompt and each model's
//! continuation. `generate` writes these and `stats --run` reads them back, through this one type.

use serde::{Deserialize, Serialize};

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
