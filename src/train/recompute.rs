//! How many sequences the checkpointed backward recomputes at once ([`Limit`]), and the memory
//! budgets behind it.
//!
//! A recomputed block keeps its whole graph for the sequences it covers. Where the attention
//! keeps [T, T] scores, those dominate and the padded layout's attention chunk bounds the
//! sequences; where the attention is the tiled op, the graph grows with the tokens alone, and as
//! many sequences go at once as fit the budget: on a GPU a block recomputed one or two sequences
//! at a time is as many launches per op as sub-batches, each product too small for the device.

/// Bytes of one recomputed block's graph on a GPU: a micro-batch of 8 pairs at `max_length` 1024
/// (at most 16k tokens) in at most two sub-batches at Qwen2-0.5B and four at SmolLM2-1.7B, where
/// the scores' chunk made 8 and 16; half a GiB, so that LoRA's small peak stays small.
pub const RECOMPUTE_BYTES: usize = 1 << 29;

/// The same on the CPU, where fresh buffers past a few MiB are page-faulted anew on every use
/// (BENCHMARKS.md, "CPU page faults"): a micro-batch of 8 real pairs at `max_length` 512 in one
/// or two sub-batches at SmolLM2-135M in f32.
pub const RECOMPUTE_BYTES_CPU: usize = 1 << 28;

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

#[cfg(test)]
mod tests {
    use super::*;

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
