//! Preference rows → token ids exactly as TRL 1.16's DPOTrainer does for conversational data
//! (`_prepare_dataset` + `DataCollatorForPreference`):
//! prompt = the turns before the final assistant turn; `prompt_ids` = template(prompt,
//! add_generation_prompt), `full` = template(prompt + answer); the completion starts at
//! min(common_prefix(prompt_ids, full_chosen), common_prefix(prompt_ids, full_rejected)).
//! Truncation is per sequence (see [`window`]); with `keep_start`, rows whose prompt alone
//! fills `max_length` are dropped.

use super::template::ChatTemplate;
use crate::config::Truncation;
use crate::data::{Message, PreferenceRow};
use crate::error::{Error, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// Why a row was not kept; counted by name in `report.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SkipReason {
    /// `chosen` or `rejected` is null, or a message lacks role/content.
    NullValue,
    /// A role other than system, user, assistant or tool.
    UnknownRole,
    /// The conversation does not end with an assistant turn.
    FinalTurnNotAssistant,
    /// The final assistant turn is empty or whitespace.
    EmptyAssistantTurn,
    /// No turns before the final assistant turn.
    EmptyPrompt,
    /// The turns before the answer differ between chosen and rejected.
    PromptMismatch,
    /// Chosen and rejected answers are the same text.
    IdenticalResponses,
    /// The chat template raised an error for this conversation.
    TemplateError,
    /// With `keep_start`, the prompt alone fills `max_length` (TRL drops these too).
    PromptTooLong,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NullValue => "null_value",
            SkipReason::UnknownRole => "unknown_role",
            SkipReason::FinalTurnNotAssistant => "final_turn_not_assistant",
            SkipReason::EmptyAssistantTurn => "empty_assistant_turn",
            SkipReason::EmptyPrompt => "empty_prompt",
            SkipReason::PromptMismatch => "prompt_mismatch",
            SkipReason::IdenticalResponses => "identical_responses",
            SkipReason::TemplateError => "template_error",
            SkipReason::PromptTooLong => "prompt_too_long",
        }
    }
}

/// A kept row: the prompt and each side's completion tokens kept by truncation.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    pub row: u64,
    pub prompt_id: String,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    pub chosen_truncated: bool,
    pub rejected_truncated: bool,
    pub score_chosen: Option<f64>,
    pub score_rejected: Option<f64>,
}

/// The validated parts of a row: shared prompt turns and the two answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation<'a> {
    pub prompt: &'a [Message],
    pub chosen: &'a Message,
    pub rejected: &'a Message,
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Checks a row and splits it into prompt and answers.
pub fn split_conversation(row: &PreferenceRow) -> Result<Conversation<'_>, SkipReason> {
    let (Some(chosen), Some(rejected)) = (&row.chosen, &row.rejected) else {
        return Err(SkipReason::NullValue);
    };
    if chosen
        .iter()
        .chain(rejected)
        .any(|m| !ROLES.contains(&m.role.as_str()))
    {
        return Err(SkipReason::UnknownRole);
    }
    let (Some(c), Some(r)) = (chosen.last(), rejected.last()) else {
        return Err(SkipReason::FinalTurnNotAssistant);
    };
    if c.role != "assistant" || r.role != "assistant" {
        return Err(SkipReason::FinalTurnNotAssistant);
    }
    if c.content.trim().is_empty() || r.content.trim().is_empty() {
        return Err(SkipReason::EmptyAssistantTurn);
    }
    let prompt = &chosen[..chosen.len() - 1];
    if prompt.is_empty() {
        return Err(SkipReason::EmptyPrompt);
    }
    if prompt != &rejected[..rejected.len() - 1] {
        return Err(SkipReason::PromptMismatch);
    }
    if c.content == r.content {
        return Err(SkipReason::IdenticalResponses);
    }
    Ok(Conversation {
        prompt,
        chosen: c,
        rejected: r,
    })
}

/// Leading tokens two sequences share.
pub fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The one truncation rule, as TRL's collator cuts `prompt ++ completion` to `max_length`:
/// `keep_start` keeps the first `max_length` tokens (so the completion's head), `keep_end` the last
/// (so the completion's tail, at most `max_length` tokens). Returns the kept completion tokens.
fn kept_completion(
    prompt_len: usize,
    completion: &[u32],
    max_length: usize,
    mode: Truncation,
) -> &[u32] {
    match mode {
        Truncation::KeepStart => {
            &completion[..max_length.saturating_sub(prompt_len).min(completion.len())]
        }
        Truncation::KeepEnd => &completion[completion.len().saturating_sub(max_length)..],
    }
}

/// The part of `prompt ++ completion` a forward sees, under [`kept_completion`]'s rule. Returns
/// (context, scored completion tokens): every kept completion token but one at position 0, which
/// no position predicts.
pub fn window<'a>(
    prompt: &'a [u32],
    completion: &'a [u32],
    max_length: usize,
    mode: Truncation,
) -> (&'a [u32], &'a [u32]) {
    let completion = kept_completion(prompt.len(), completion, max_length, mode);
    let room = max_length.saturating_sub(completion.len());
    let prompt = &prompt[prompt.len().saturating_sub(room)..];
    if prompt.is_empty() && !completion.is_empty() {
        (&completion[..1], &completion[1..])
    } else {
        (prompt, completion)
    }
}

/// Completion tokens kept by truncation (what the cache stores) and whether any were cut.
fn kept(
    prompt: &[u32],
    completion: &[u32],
    max_length: usize,
    mode: Truncation,
) -> (Vec<u32>, bool) {
    let kept = kept_completion(prompt.len(), completion, max_length, mode);
    (kept.to_vec(), kept.len() < completion.len())
}

/// Tokenizer + chat template + truncation rule.
pub struct PairTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub template: ChatTemplate,
    pub max_length: usize,
    pub truncation: Truncation,
    tokenizer_sha256: String,
}

impl PairTokenizer {
    /// Loads `tokenizer.json` (as transformers 5 runs it) and the chat template of a model directory.
    pub fn from_dir(dir: &Path, max_length: usize, truncation: Truncation) -> Result<Self> {
        let (tokenizer, bytes) = super::backend::load(dir)?;
        Ok(Self {
            tokenizer,
            template: ChatTemplate::from_dir(dir)?,
            max_length,
            truncation,
            tokenizer_sha256: format!("{:x}", Sha256::digest(&bytes)),
        })
    }

    pub fn tokenizer_sha256(&self) -> &str {
        &self.tokenizer_sha256
    }

    /// Renders and tokenizes messages (no special tokens added: the template carries them).
    pub fn encode_messages(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.template.render(messages, add_generation_prompt)?;
        self.encode(&text)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenize(format!("tokenizer failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// One row → kept pair, or the reason it is skipped.
    pub fn tokenize(&self, row: &PreferenceRow) -> Result<TokenizedPair, SkipReason> {
        let conv = split_conversation(row)?;
        let with = |answer: &Message| {
            let mut msgs = conv.prompt.to_vec();
            msgs.push(answer.clone());
            self.encode_messages(&msgs, false)
        };
        let encoded = (
            self.encode_messages(conv.prompt, true),
            with(conv.chosen),
            with(conv.rejected),
        );
        let (Ok(prompt_ids), Ok(full_c), Ok(full_r)) = encoded else {
            return Err(SkipReason::TemplateError);
        };
        let k = common_prefix_length(&prompt_ids, &full_c)
            .min(common_prefix_length(&prompt_ids, &full_r));
        let prompt = &prompt_ids[..k];
        if k == 0 {
            return Err(SkipReason::EmptyPrompt);
        }
        if self.truncation == Truncation::KeepStart && prompt.len() >= self.max_length {
            return Err(SkipReason::PromptTooLong);
        }
        let (chosen_ids, chosen_truncated) =
            kept(prompt, &full_c[k..], self.max_length, self.truncation);
        let (rejected_ids, rejected_truncated) =
            kept(prompt, &full_r[k..], self.max_length, self.truncation);
        Ok(TokenizedPair {
            row: row.row,
            prompt_id: row.prompt_id.clone(),
            prompt_ids: prompt.to_vec(),
            chosen_ids,
            rejected_ids,
            chosen_truncated,
            rejected_truncated,
            score_chosen: row.score_chosen,
            score_rejected: row.score_rejected,
        })
    }

    /// Tokenizes rows in parallel (rayon), keeping row order; returns kept pairs and skip counts.
    pub fn tokenize_all(
        &self,
        rows: &[PreferenceRow],
    ) -> (Vec<TokenizedPair>, BTreeMap<String, usize>) {
        let results: Vec<_> = rows.par_iter().map(|r| self.tokenize(r)).collect();
        let mut kept = Vec::with_capacity(rows.len());
        let mut dropped = BTreeMap::new();
        for r in results {
            match r {
                Ok(p) => kept.push(p),
                Err(reason) => *dropped.entry(reason.as_str().to_string()).or_insert(0) += 1,
            }
        }
        (kept, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        chosen: Option<Vec<(&str, &str)>>,
        rejected: Option<Vec<(&str, &str)>>,
    ) -> PreferenceRow {
        let conv = |v: Vec<(&str, &str)>| v.into_iter().map(|(r, c)| Message::new(r, c)).collect();
        PreferenceRow {
            row: 0,
            prompt_id: "p".into(),
            chosen: chosen.map(conv),
            rejected: rejected.map(conv),
            score_chosen: None,
            score_rejected: None,
        }
    }

    #[test]
    fn each_skip_reason() {
        let ok = vec![("user", "q"), ("assistant", "a")];
        let cases = [
            (row(None, Some(ok.clone())), SkipReason::NullValue),
            (
                row(
                    Some(vec![("robot", "q"), ("assistant", "a")]),
                    Some(ok.clone()),
                ),
                SkipReason::UnknownRole,
            ),
            (
                row(Some(vec![("user", "q")]), Some(ok.clone())),
                SkipReason::FinalTurnNotAssistant,
            ),
            (
                row(Some(vec![]), Some(ok.clone())),
                SkipReason::FinalTurnNotAssistant,
            ),
            (
                row(
                    Some(vec![("user", "q"), ("assistant", "  ")]),
                    Some(ok.clone()),
                ),
                SkipReason::EmptyAssistantTurn,
            ),
            (
                row(
                    Some(vec![("assistant", "a")]),
                    Some(vec![("assistant", "b")]),
                ),
                SkipReason::EmptyPrompt,
            ),
            (
                row(
                    Some(vec![("user", "q2"), ("assistant", "b")]),
                    Some(ok.clone()),
                ),
                SkipReason::PromptMismatch,
            ),
            (
                row(Some(ok.clone()), Some(ok.clone())),
                SkipReason::IdenticalResponses,
            ),
        ];
        for (r, want) in cases {
            assert_eq!(split_conversation(&r).unwrap_err(), want);
        }
        let good = row(Some(ok), Some(vec![("user", "q"), ("assistant", "b")]));
        assert_eq!(split_conversation(&good).unwrap().rejected.content, "b");
    }

    #[test]
    fn windows_follow_trls_collator() {
        let (p, c) = ([1, 2, 3], [4, 5, 6, 7]);
        assert_eq!(window(&p, &c, 10, Truncation::KeepStart), (&p[..], &c[..]));
        assert_eq!(window(&p, &c, 5, Truncation::KeepStart), (&p[..], &c[..2]));
        assert_eq!(window(&p, &c, 5, Truncation::KeepEnd), (&p[2..], &c[..]));
        // Completion alone longer than max_length: its first kept token is context, not scored.
        assert_eq!(window(&p, &c, 3, Truncation::KeepEnd), (&c[1..2], &c[2..]));
        assert_eq!(kept(&p, &c, 5, Truncation::KeepStart), (vec![4, 5], true));
        assert_eq!(kept(&p, &c, 3, Truncation::KeepEnd), (vec![5, 6, 7], true));
        assert_eq!(kept(&p, &c, 9, Truncation::KeepEnd), (c.to_vec(), false));
    }
}
