//! How many sequences the checkpointed backward recomputes at once ([`Limit`]), the memory
//! budgets behind it, and the sub-batches that follow ([`sub_batches`]).
//!
//! A recomputed block keeps its whole graph for the sequences it covers. Where the attention
//! keeps [T, T] scores, those dominate and the padded layout's attention chunk bounds the
//! sequences; where the attention is the tiled op, the graph grows with the tokens alone, and as
//! many sequences go at once as fit the budget: on a GPU a block recomputed one or two sequences
//! at a time is as many launches per op as sub-batches, each product too small for the device.

use crate::error::Result;
use crate::model::SeqContext;
use candle_core::Tensor;

/// Bytes of one recomputed block's graph on a GPU: a micro-batch of 8 pairs at `max_length` 1024
/// (at most 16k tokens) in at most two sub-batches at Qwen2-0.5B and four at SmolLM2-1.7B, where
/// the scores' chunk made 8 and 16; half a GiB, so that LoRA's small peak stays small.
pub const RECOMPUTE_BYTES: usize = 1 << 29;

/// The same on the CPU, where fresh buffers past a few MiB are page-faulted anew on every use
/// (BENCHMARKS.md, "CPU page faults"): a micro-batch of 8 real pairs at `max_length` 512 in one
/// or two sub-batches at SmolLM2-135M in f32.
pub const RECOMPUTE_BYTES_CPU: usize = 1 << 28;

/// `REFDPO_RECOMPUTE_MIB`: another budget for one recomputed block's graph, in MiB (to measure
/// another sub-batching on a device); unset, [`RECOMPUTE_BYTES`] ([`RECOMPUTE_BYTES_CPU`] on the
/// CPU).
pub fn budget_setting() -> Result<Option<usize>> {
    match std::env::var("REFDPO_RECOMPUTE_MIB") {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => budget_of(&v.to_string_lossy()).map(Some),
        Ok(v) => budget_of(&v).map(Some),
    }
}

/// A budget in bytes from its setting in MiB: a whole number from 1 to 1 TiB's worth.
fn budget_of(v: &str) -> Result<usize> {
    match v.trim().parse::<usize>() {
        Ok(mib @ 1..=1_048_576) => Ok(mib << 20),
        _ => Err(crate::error::Error::Config(format!(
            "REFDPO_RECOMPUTE_MIB={v:?}: it takes a whole number of MiB from 1 to 1048576, the \
             memory one recomputed block's graph may take (unset: 512 on a GPU, 256 on the CPU)"
        ))),
    }
}

/// Rows of the hidden size (x, norms, q, k, v, attention output, projections, residuals) and of
/// the MLP's intermediate size (gate, up, their product) one token keeps in a block's graph:
/// an upper estimate for the families refdpo runs.
pub const GRAPH_HIDDEN_ROWS: usize = 10;
pub const GRAPH_MLP_ROWS: usize = 4;

/// The bound on a recomputed sub-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// At most this many sequences.
    Seqs(usize),
    /// Sequences in order while their tokens fit, and always at least one.
    Tokens(usize),
}

impl Limit {
    /// Packed sequences of `lens` tokens, in order, cut into sub-batches.
    pub fn groups<'a>(&self, lens: &'a [usize]) -> Vec<&'a [usize]> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < lens.len() {
            let mut end = start + 1;
            let mut tokens = lens[start];
            while end < lens.len() {
                let fits = match *self {
                    Limit::Seqs(n) => end - start < n,
                    Limit::Tokens(n) => tokens + lens[end] <= n,
                };
                if !fits {
                    break;
                }
                tokens += lens[end];
                end += 1;
            }
            out.push(&lens[start..end]);
            start = end;
        }
        out
    }

    /// Padded rows of `t` positions per sub-batch (at least one).
    pub fn rows(&self, t: usize) -> usize {
        match *self {
            Limit::Seqs(n) => n,
            Limit::Tokens(n) => n / t.max(1),
        }
        .max(1)
    }
}

/// One recomputed sub-batch: its first sequence (for its dropout masks), its positions along
/// the batch's dim, and its context.
#[derive(Clone)]
pub struct Sub {
    pub first_seq: usize,
    pub start: usize,
    pub len: usize,
    pub ctx: SeqContext,
}

/// x's sub-batches under `limit`, and the dim they cut (1 for a packed row, 0 for padded rows).
/// `ctx` is the forward's context, `full` the unpacked tables it was made from. With shared
/// prompts, whole pairs go together (no dropout there, so no first sequence).
pub fn sub_batches(
    limit: Limit,
    x: &Tensor,
    (ctx, full): (&SeqContext, &SeqContext),
) -> Result<(usize, Vec<Sub>)> {
    let sub = |first_seq, start, len, ctx| Sub {
        first_seq,
        start,
        len,
        ctx,
    };
    Ok(match (&ctx.shared, &ctx.segments) {
        (Some(shared), _) => {
            let units = shared.units()?;
            let rows: Vec<usize> = units.iter().map(|u| u.2).collect();
            let mut subs = Vec::new();
            let (mut unit, mut at) = (0, 0);
            for group in limit.groups(&rows) {
                let len: usize = group.iter().sum();
                // the whole batch at once (a GPU's usual case) keeps the forward's context
                let part_ctx = if group.len() == units.len() {
                    ctx.clone()
                } else {
                    let (first, _, _) = units[unit];
                    let last = units[unit + group.len() - 1];
                    let part = shared.part(first, last.0 + last.1 - first, x.device())?;
                    full.sharing(part)?
                };
                subs.push(sub(0, at, len, part_ctx));
                (unit, at) = (unit + group.len(), at + len);
            }
            (1, subs)
        }
        (None, Some(lens)) => {
            let mut subs = Vec::new();
            let (mut first, mut at) = (0, 0);
            for group in limit.groups(lens) {
                let len: usize = group.iter().sum();
                subs.push(sub(first, at, len, full.packed(group)?));
                (first, at) = (first + group.len(), at + len);
            }
            (1, subs)
        }
        (None, None) => {
            let (b, t) = (x.dim(0)?, x.dim(1)?);
            let step = limit.rows(t);
            let subs = (0..b)
                .step_by(step)
                .map(|start| sub(start, start, step.min(b - start), ctx.clone()))
                .collect();
            (0, subs)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_setting_takes_whole_mib() {
        assert_eq!(budget_of("1024").unwrap(), 1 << 30);
        assert_eq!(budget_of(" 1 ").unwrap(), 1 << 20);
        for bad in [
            "0",
            "-5",
            "1.5",
            "",
            "lots",
            "1048577",
            "99999999999999999999999",
        ] {
            let err = budget_of(bad).unwrap_err().to_string();
            assert!(err.contains("REFDPO_RECOMPUTE_MIB"), "{bad}: {err}");
        }
    }

    #[test]
    fn sub_batches_keep_order_and_cover_every_sequence() {
        let lens = [300, 500, 200, 900, 100, 100];
        let by_tokens = Limit::Tokens(1000).groups(&lens);
        assert_eq!(
            by_tokens,
            vec![&[300, 500, 200][..], &[900, 100][..], &[100][..]]
        );
        // a sequence longer than the budget goes alone
        assert_eq!(Limit::Tokens(250).groups(&[300, 100, 100, 100]).len(), 3);
        assert_eq!(
            Limit::Seqs(4).groups(&lens),
            vec![&[300, 500, 200, 900][..], &[100, 100][..]]
        );
        assert_eq!(Limit::Seqs(1).groups(&lens).len(), lens.len());
        for limit in [Limit::Tokens(1), Limit::Tokens(1 << 20), Limit::Seqs(3)] {
            let flat: Vec<usize> = limit.groups(&lens).concat();
            assert_eq!(flat, lens);
        }
        assert!(Limit::Tokens(10).groups(&[]).is_empty());
    }

    #[test]
    fn padded_rows_follow_the_budget() {
        assert_eq!(Limit::Tokens(4096).rows(1024), 4);
        assert_eq!(Limit::Tokens(100).rows(1024), 1);
        assert_eq!(Limit::Seqs(3).rows(1024), 3);
    }
}
