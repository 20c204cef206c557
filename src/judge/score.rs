//! What the reward model reads: each judged prompt's conversation, rendered with the reward
//! model's own tokenizer and chat template (SPEC, "Judging generations"), and the scores.
//!
//! A conversational row becomes its prompt messages plus one assistant message (a generation's
//! decoded text, or the split's chosen or rejected turns); a plain-text row becomes the prompt
//! text followed by the answer, tokenized with the special tokens the reward model's tokenizer
//! adds, the answer ending in its EOS token as TRL's standard layout has it.

use crate::data::{Message, PreferenceRow};
use crate::error::{Error, Result};
use crate::model::reward::RewardModel;
use crate::progress::Progress;
use crate::tokenize::pairs::{split_pair, Pair};
use crate::tokenize::PairTokenizer;

/// Which answer follows the prompt.
pub enum Answer<'a> {
    /// A generation's decoded text.
    Text(&'a str),
    Chosen,
    Rejected,
}

/// The reward model's tokenizer and template, and the longest sequence it takes.
pub struct Reader {
    pub tokenizer: PairTokenizer,
    pub max_positions: usize,
}

impl Reader {
    /// Token ids of `row`'s prompt followed by `answer`, as the reward model reads them.
    pub fn ids(&self, row: &PreferenceRow, answer: Answer) -> Result<Vec<u32>> {
        let tok = &self.tokenizer;
        let pair = split_pair(row, tok.template.eos_token()).map_err(|reason| {
            Error::Config(format!(
                "row {} (prompt_id {}) of the split is not a valid pair ({}): the judge reads \
                 the prompts `generate` read, so the split changed since",
                row.row,
                row.prompt_id,
                reason.as_str()
            ))
        })?;
        let ids = match pair {
            Pair::Chat(conv) => {
                let mut msgs = conv.prompt.to_vec();
                match answer {
                    Answer::Text(t) => msgs.push(Message::new("assistant", t)),
                    Answer::Chosen => msgs.extend_from_slice(conv.chosen),
                    Answer::Rejected => msgs.extend_from_slice(conv.rejected),
                }
                tok.encode_messages(&msgs, false)?
            }
            Pair::Text {
                prompt,
                chosen,
                rejected,
            } => {
                // set: split_pair refuses a plain-text row without one
                let eos = tok.template.eos_token().unwrap_or_default();
                let text = match answer {
                    Answer::Text(t) => format!("{prompt}{t}{eos}"),
                    Answer::Chosen => format!("{prompt}{chosen}"),
                    Answer::Rejected => format!("{prompt}{rejected}"),
                };
                tok.encode_text(&text)?
            }
        };
        if ids.is_empty() {
            return Err(Error::Config(format!(
                "row {} (prompt_id {}): no tokens for the reward model",
                row.row, row.prompt_id
            )));
        }
        Ok(ids)
    }

    /// Whether the reward model reads `ids` whole (within its max_position_embeddings).
    pub fn fits(&self, ids: &[u32]) -> bool {
        ids.len() <= self.max_positions
    }
}

/// Every sequence's reward, shortest first in batches of `batch` (less padding), returned in
/// input order.
pub fn score_all(
    model: &RewardModel,
    seqs: &[Vec<u32>],
    batch: usize,
    quiet: bool,
) -> Result<Vec<f64>> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    let progress = Progress::new(seqs.len() as u64, "judge", quiet);
    let mut out = vec![0.0; seqs.len()];
    for chunk in order.chunks(batch.max(1)) {
        let refs: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i].as_slice()).collect();
        for (&i, r) in chunk.iter().zip(model.score(&refs, refs.len())?) {
            if !r.is_finite() {
                return Err(Error::Model(format!(
                    "the reward model scored a sequence {r}: its weights or the input overflow"
                )));
            }
            out[i] = r;
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    Ok(out)
}
