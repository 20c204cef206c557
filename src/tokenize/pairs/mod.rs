//! Preference rows → token ids exactly as TRL 1.16's DPOTrainer does (`_prepare_dataset` +
//! `DataCollatorForPreference`), in each of its layouts. The prompt is the explicit one, or the
//! one `extract_prompt` finds (common leading turns, or the common prefix of two strings).
//! Conversational: `prompt_ids` = template(prompt, add_generation_prompt), `full` =
//! template(prompt + answer). Standard: answers get the EOS token, then `prompt_ids` =
//! tokenizer(prompt), `full` = tokenizer(prompt + answer), special tokens included. The
//! completion starts at min(common_prefix(prompt_ids, full_chosen), common_prefix(prompt_ids,
//! full_rejected)).
//! Truncation is per sequence (see [`window`]); with `keep_start`, rows whose prompt alone
//! fills `max_length` are dropped.

use super::template::ChatTemplate;
use crate::config::Truncation;
use crate::data::{Message, PreferenceRow, Skipped, TemplateInputs, Turns};
use crate::error::{Error, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::path::Path;

pub use crate::data::SkipReason;

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

/// The validated parts of a conversational row: the prompt turns and each side's answer turns.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation<'a> {
    pub prompt: &'a [Message],
    pub chosen: &'a [Message],
    pub rejected: &'a [Message],
}

/// A validated row in one of TRL's two kinds, its prompt explicit.
#[derive(Debug, Clone, PartialEq)]
pub enum Pair<'a> {
    Chat(Conversation<'a>),
    /// Standard (plain-text) layout: the answers end with the EOS token, as TRL's `add_eos`
    /// leaves them.
    Text {
        prompt: String,
        chosen: String,
        rejected: String,
    },
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// TRL's `extract_prompt` (trl/data_utils.py), Python semantics included: the index where
/// `chosen` and `rejected` first differ, moved back one when the item before it is a space
/// (strings only); the last index when one is a prefix of the other; and Python's negative
/// index when that moves it to -1. Returns (prompt end in chosen, answer starts in chosen and
/// rejected); `None` for two empty sides (TRL fails there).
fn extract_prompt<T: PartialEq>(
    c: &[T],
    r: &[T],
    is_space: impl Fn(&T) -> bool,
) -> Option<(usize, usize, usize)> {
    let n = c.len().min(r.len());
    if n == 0 {
        return None;
    }
    let mut idx = n as isize - 1;
    for i in 0..n {
        if c[i] != r[i] {
            idx = i as isize;
            let before = if i == 0 { c.len() - 1 } else { i - 1 };
            if is_space(&c[before]) {
                idx -= 1;
            }
            break;
        }
    }
    let at = |len: usize| -> usize {
        if idx < 0 {
            len.saturating_sub(idx.unsigned_abs())
        } else {
            (idx as usize).min(len)
        }
    };
    Some((at(c.len()), at(c.len()), at(r.len())))
}

/// Checks a row and splits it into prompt and answers: the explicit prompt, or the one TRL's
/// `extract_prompt` finds. Standard answers get the EOS token appended where they lack it.
/// Without an EOS token (None), a standard row is a `template_error`: TRL appends the EOS token to
/// plain-text answers and fails without one.
pub fn split_pair<'a>(
    row: &'a PreferenceRow,
    eos_token: Option<&str>,
) -> Result<Pair<'a>, SkipReason> {
    let (Some(chosen), Some(rejected)) = (&row.chosen, &row.rejected) else {
        return Err(SkipReason::NullValue);
    };
    match (chosen, rejected) {
        (Turns::Messages(c), Turns::Messages(r)) => {
            let prompt = row.prompt.as_ref().and_then(Turns::messages);
            split_chat(prompt, c, r).map(Pair::Chat)
        }
        (Turns::Text(c), Turns::Text(r)) => {
            let prompt = match &row.prompt {
                Some(Turns::Text(p)) => Some(p.as_str()),
                _ => None,
            };
            split_text(prompt, c, r, eos_token.ok_or(SkipReason::TemplateError)?)
        }
        _ => Err(SkipReason::WrongType),
    }
}

fn split_chat<'a>(
    prompt: Option<&'a [Message]>,
    c: &'a [Message],
    r: &'a [Message],
) -> Result<Conversation<'a>, SkipReason> {
    let explicit = prompt.is_some();
    let (prompt, chosen, rejected) = match prompt {
        Some(p) => (p, c, r),
        None => match extract_prompt(c, r, |_| false) {
            Some((p, ci, ri)) => (&c[..p], &c[ci..], &r[ri..]),
            None => (&c[..0], c, r),
        },
    };
    if prompt
        .iter()
        .chain(chosen)
        .chain(rejected)
        .any(|m| !ROLES.contains(&m.role.as_str()))
    {
        return Err(SkipReason::UnknownRole);
    }
    let (Some(a), Some(b)) = (chosen.last(), rejected.last()) else {
        return Err(SkipReason::FinalTurnNotAssistant);
    };
    if a.role != "assistant" || b.role != "assistant" {
        return Err(SkipReason::FinalTurnNotAssistant);
    }
    // an answer that only calls a tool is not empty: the template renders the call
    let empty =
        |m: &Message| m.content.is_blank() && m.extra.get("tool_calls").is_none_or(|v| v.is_null());
    if empty(a) || empty(b) {
        return Err(SkipReason::EmptyAssistantTurn);
    }
    // More than the answer left after a prompt taken from the conversations: the turns before
    // the answers differ. After an explicit prompt, every turn is the completion, as TRL
    // tokenizes it (an agent's tool calls, their results and its answer).
    if !explicit && (chosen.len() > 1 || rejected.len() > 1) {
        return Err(SkipReason::PromptMismatch);
    }
    if prompt.is_empty() {
        return Err(SkipReason::EmptyPrompt);
    }
    if chosen == rejected {
        return Err(SkipReason::IdenticalResponses);
    }
    Ok(Conversation {
        prompt,
        chosen,
        rejected,
    })
}

fn split_text<'a>(
    prompt: Option<&str>,
    c: &str,
    r: &str,
    eos_token: &str,
) -> Result<Pair<'a>, SkipReason> {
    let (prompt, chosen, rejected): (String, String, String) = match prompt {
        Some(p) => (p.into(), c.into(), r.into()),
        None => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            match extract_prompt(&cc, &rc, |ch| *ch == ' ') {
                Some((p, ci, ri)) => (
                    cc[..p].iter().collect(),
                    cc[ci..].iter().collect(),
                    rc[ri..].iter().collect(),
                ),
                None => (String::new(), c.into(), r.into()),
            }
        }
    };
    if chosen.trim().is_empty() || rejected.trim().is_empty() {
        return Err(SkipReason::EmptyAssistantTurn);
    }
    if prompt.is_empty() {
        return Err(SkipReason::EmptyPrompt);
    }
    if chosen == rejected {
        return Err(SkipReason::IdenticalResponses);
    }
    let with_eos = |s: String| {
        if s.ends_with(eos_token) {
            s
        } else {
            s + eos_token
        }
    };
    Ok(Pair::Text {
        prompt,
        chosen: with_eos(chosen),
        rejected: with_eos(rejected),
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
    tokenizer_config_sha256: String,
}

/// The tokenizer's settings files besides `tokenizer.json`, hashed into the cache fingerprint.
pub const SETTINGS_FILES: [&str; 2] = ["tokenizer_config.json", "special_tokens_map.json"];

/// SHA-256 over the [`SETTINGS_FILES`] present in `dir`, each as its name, a NUL byte and its
/// bytes (the Python package's `tokenizer_config_sha256` computes the same).
fn settings_sha256(dir: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for name in SETTINGS_FILES {
        let path = dir.join(name);
        if path.is_file() {
            h.update(name.as_bytes());
            h.update([0u8]);
            h.update(crate::error::fs::read(&path)?);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

impl PairTokenizer {
    /// Loads `tokenizer.json` (as transformers 5 runs it) and the chat template of a model directory.
    pub fn from_dir(dir: &Path, max_length: usize, truncation: Truncation) -> Result<Self> {
        let (tokenizer, bytes) = super::backend::load(dir)?;
        // a template's output past twice the largest row it can be given is runaway output
        let template = ChatTemplate::from_dir(dir)?
            .limit_output(crate::data::max_row_bytes(max_length).saturating_mul(2));
        Ok(Self {
            tokenizer,
            template,
            max_length,
            truncation,
            tokenizer_sha256: format!("{:x}", Sha256::digest(&bytes)),
            tokenizer_config_sha256: settings_sha256(dir)?,
        })
    }

    pub fn tokenizer_sha256(&self) -> &str {
        &self.tokenizer_sha256
    }

    pub fn tokenizer_config_sha256(&self) -> &str {
        &self.tokenizer_config_sha256
    }

    /// Renders and tokenizes messages (no special tokens added: the template carries them).
    pub fn encode_messages(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode_messages_with(messages, add_generation_prompt, &TemplateInputs::default())
    }

    /// [`Self::encode_messages`] with a row's `tools` and `chat_template_kwargs`.
    pub fn encode_messages_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        inputs: &TemplateInputs,
    ) -> Result<Vec<u32>> {
        let text = self
            .template
            .render_with(messages, add_generation_prompt, inputs)?;
        self.encode(&text)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // its regex engine panics past its backtracking limit on some patterns and inputs
        let enc = crate::error::catch_quietly(|| self.tokenizer.encode(text, false))
            .map_err(|why| Error::Tokenize(format!("the tokenizer failed on this text: {why}")))?
            .map_err(|e| Error::Tokenize(format!("tokenizer failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenizes plain text as transformers' `tokenizer(text)` does: with the special tokens
    /// its post-processor adds (a BOS for Llama-style tokenizers).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        // its regex engine panics past its backtracking limit on some patterns and inputs
        let enc = crate::error::catch_quietly(|| self.tokenizer.encode(text, true))
            .map_err(|why| Error::Tokenize(format!("the tokenizer failed on this text: {why}")))?
            .map_err(|e| Error::Tokenize(format!("tokenizer failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The token ids TRL 1.16 computes for a pair: (prompt, prompt + chosen, prompt + rejected).
    fn encode_pair(
        &self,
        pair: &Pair,
        inputs: &TemplateInputs,
    ) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
        match pair {
            Pair::Chat(conv) => {
                let with = |answer: &[Message]| {
                    let mut msgs = conv.prompt.to_vec();
                    msgs.extend_from_slice(answer);
                    self.encode_messages_with(&msgs, false, inputs)
                };
                Ok((
                    self.encode_messages_with(conv.prompt, true, inputs)?,
                    with(conv.chosen)?,
                    with(conv.rejected)?,
                ))
            }
            Pair::Text {
                prompt,
                chosen,
                rejected,
            } => Ok((
                self.encode_text(prompt)?,
                self.encode_text(&format!("{prompt}{chosen}"))?,
                self.encode_text(&format!("{prompt}{rejected}"))?,
            )),
        }
    }

    /// One row → kept pair, or the reason it is skipped.
    pub fn tokenize(&self, row: &PreferenceRow) -> Result<TokenizedPair, SkipReason> {
        self.tokenize_explained(row).map_err(|(reason, _)| reason)
    }

    /// [`Self::tokenize`], with the template's or tokenizer's own message where one failed.
    fn tokenize_explained(
        &self,
        row: &PreferenceRow,
    ) -> Result<TokenizedPair, (SkipReason, Option<String>)> {
        let pair = split_pair(row, self.template.eos_token()).map_err(|r| {
            let why = (r == SkipReason::TemplateError).then(|| {
                "tokenizer_config.json sets no `eos_token`: TRL appends it to plain-text answers \
                 (and fails without one); set `eos_token` there"
                    .to_string()
            });
            (r, why)
        })?;
        let (prompt_ids, full_c, full_r) = self
            .encode_pair(&pair, &row.template)
            .map_err(|e| (SkipReason::TemplateError, Some(e.to_string())))?;
        let skip = |r: SkipReason| Err((r, None));
        let k = common_prefix_length(&prompt_ids, &full_c)
            .min(common_prefix_length(&prompt_ids, &full_r));
        let prompt = &prompt_ids[..k];
        if k == 0 {
            return skip(SkipReason::EmptyPrompt);
        }
        if self.truncation == Truncation::KeepStart && prompt.len() >= self.max_length {
            return skip(SkipReason::PromptTooLong);
        }
        let (chosen_ids, chosen_truncated) =
            kept(prompt, &full_c[k..], self.max_length, self.truncation);
        let (rejected_ids, rejected_truncated) =
            kept(prompt, &full_r[k..], self.max_length, self.truncation);
        let prompt_id = if row.prompt_id.is_empty() {
            prompt_hash(&pair)
        } else {
            row.prompt_id.clone()
        };
        Ok(TokenizedPair {
            row: row.row,
            prompt_id,
            prompt_ids: prompt.to_vec(),
            chosen_ids,
            rejected_ids,
            chosen_truncated,
            rejected_truncated,
            score_chosen: row.score_chosen,
            score_rejected: row.score_rejected,
        })
    }

    /// Tokenizes rows in parallel (rayon), keeping row order: each a kept pair, or the row
    /// skipped with its reason.
    pub fn tokenize_batch(&self, rows: &[PreferenceRow]) -> Vec<Result<TokenizedPair, Skipped>> {
        rows.par_iter()
            .map(|row| {
                self.tokenize_explained(row)
                    .map_err(|(reason, detail)| Skipped {
                        row: row.row,
                        line: row.line,
                        reason: reason.as_str(),
                        detail,
                    })
            })
            .collect()
    }
}

/// The `prompt_id` stage one gives `row`: the source's, or for a source without one the
/// [`prompt_hash`] of its prompt (`None` for a row that is not a pair).
pub fn prompt_id(row: &PreferenceRow) -> Option<String> {
    if !row.prompt_id.is_empty() {
        return Some(row.prompt_id.clone());
    }
    // The prompt does not depend on the EOS token (only the text answers end with it).
    split_pair(row, Some(""))
        .ok()
        .map(|pair| prompt_hash(&pair))
}

/// SHA-256 of the prompt (its text, or its messages as JSON): the `prompt_id` of a source
/// without one.
fn prompt_hash(pair: &Pair) -> String {
    let text = match pair {
        Pair::Chat(c) => serde_json::to_string(c.prompt).expect("messages serialize"),
        Pair::Text { prompt, .. } => prompt.clone(),
    };
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests;
