//! One micro-batch gathered from the cache: the packed sequences (chosen first, then rejected) and
//! each pair's reference log-probs — from the cache, or from a live reference model.

use super::split::Split;
use crate::config::Truncation;
use crate::dpo::PairLogps;
use crate::error::Result;
use crate::logprobs::{self, SeqBatch};
use crate::model::{OpMode, Transformer};
use crate::tokenize::window;
use candle_core::Device;

pub struct MicroBatch {
    pub seqs: SeqBatch,
    ref_chosen: Vec<f64>,
    ref_rejected: Vec<f64>,
    chosen_len: Vec<f64>,
    rejected_len: Vec<f64>,
    /// Tokens put through the model (both sequences of every pair, after truncation).
    pub tokens: usize,
}

impl MicroBatch {
    /// Pairs `idx` of `split`; with `reference`, its log-probs replace the cached ones. `share`:
    /// each pair's prompt is computed once ([`SeqBatch::pairs_shared`]; not under LoRA dropout,
    /// whose masks follow whole sequences).
    pub fn gather(
        split: &Split,
        idx: &[usize],
        (max_length, truncation): (usize, Truncation),
        reference: Option<&Transformer>,
        share: bool,
        device: &Device,
    ) -> Result<Self> {
        let pairs: Vec<_> = idx
            .iter()
            .map(|&i| {
                let (b, r) = split.pair(i);
                (b.prompt_ids(r), b.chosen_ids(r), b.rejected_ids(r))
            })
            .collect();
        // packed end to end: no padding position is computed, forward or backward
        let seqs = if share {
            SeqBatch::pairs_shared(&pairs, max_length, truncation, device)?
        } else {
            SeqBatch::pairs(&pairs, max_length, truncation, None, device)?
        };
        let (mut ref_chosen, mut ref_rejected): (Vec<f64>, Vec<f64>) = idx
            .iter()
            .map(|&i| {
                let (b, r) = split.pair(i);
                (b.ref_chosen(r), b.ref_rejected(r))
            })
            .unzip();
        if let Some(reference) = reference {
            // the frozen reference scores as stage one does: each pair's prompt computed once
            let shared = (seqs.shared.is_none() && logprobs::shares_prompts())
                .then(|| SeqBatch::pairs_shared(&pairs, max_length, truncation, device))
                .transpose()?;
            let scored = shared.as_ref().unwrap_or(&seqs);
            let sums = logprobs::score(reference, scored, OpMode::scoring(device))?;
            let n = idx.len();
            ref_chosen = sums[..n].to_vec();
            ref_rejected = sums[n..].to_vec();
        }
        // Completion tokens in each truncated sequence (TRL's normalizer for ipo / sigmoid_norm):
        // the cache stores exactly the kept completion tokens.
        let chosen_len = pairs.iter().map(|(_, c, _)| c.len() as f64).collect();
        let rejected_len = pairs.iter().map(|(_, _, r)| r.len() as f64).collect();
        let tokens = pairs
            .iter()
            .map(|(p, c, r)| {
                let (a, b) = window(p, c, max_length, truncation);
                let (d, e) = window(p, r, max_length, truncation);
                a.len() + b.len() + d.len() + e.len()
            })
            .sum();
        Ok(Self {
            seqs,
            ref_chosen,
            ref_rejected,
            chosen_len,
            rejected_len,
            tokens,
        })
    }

    /// The loss inputs, given the policy's per-sequence sums (chosen first, then rejected).
    pub fn pair_logps(&self, sums: &[f64]) -> PairLogps {
        let n = self.ref_chosen.len();
        PairLogps {
            policy_chosen: sums[..n].to_vec(),
            policy_rejected: sums[n..].to_vec(),
            ref_chosen: self.ref_chosen.clone(),
            ref_rejected: self.ref_rejected.clone(),
            chosen_len: self.chosen_len.clone(),
            rejected_len: self.rejected_len.clone(),
            chosen_scored_tokens: self.seqs.counts[..n].iter().sum::<usize>() as f64,
        }
    }
}
