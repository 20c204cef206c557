//! A batch's layout: its sequences right-padded to one length, packed end to end along one row,
//! or packed with each pair's rejected sequence taking its first positions (the prompt) from the
//! chosen one's rows; and where the positions that predict each completion token are.

use crate::config::Truncation;
use crate::error::{Error, Result};
use crate::model::gather_rows::{gather_rows, RowMap};
use crate::model::{Piece, SeqContext, Sharing};
use crate::tokenize::window;
use candle_core::{DType, Device, Tensor};

/// A batch of `prompt ++ completion` sequences and where their completions are: right-padded
/// to [B, T], or packed end to end into one row [1, Σ len] with no padding (`segments`).
#[derive(Debug)]
pub struct SeqBatch {
    /// [B, T] u32, or [1, Σ len] when packed
    pub input_ids: Tensor,
    /// The same ids on the host (the embedding's backward sorts them there).
    pub host_ids: Vec<u32>,
    /// [N] u32: flat index (b·T + t, or the packed offset) of the position predicting each
    /// completion token.
    pub gather_idx: Tensor,
    /// The same indices on the host (a tracked gather builds its backward's maps from them).
    pub gather_host: Vec<u32>,
    /// [N] u32: the completion tokens.
    pub targets: Tensor,
    /// Completion tokens per sequence (sums to N).
    pub counts: Vec<usize>,
    /// The longest sequence.
    pub seq_len: usize,
    /// Packed: each sequence's length, in row order (with `shared`, all its positions, shared
    /// and own, in the whole layout's order: [`Sharing::lens`]).
    pub segments: Option<Vec<usize>>,
    /// Packed with shared first positions ([`SeqBatch::pairs_shared`]): its sequences' rows.
    pub shared: Option<Sharing>,
}

impl SeqBatch {
    /// `seqs`: (prompt, completion) per sequence, right-padded with `pad_id`. Each prompt must
    /// be non-empty.
    pub fn new(seqs: &[(&[u32], &[u32])], pad_id: u32, device: &Device) -> Result<Self> {
        let t = seqs
            .iter()
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(0);
        Self::laid_out(seqs, Some((pad_id, t)), device)
    }

    /// `seqs` packed end to end into one row: no position is padding, and each sequence
    /// attends within itself ([`SeqContext::packed`]).
    pub fn packed(seqs: &[(&[u32], &[u32])], device: &Device) -> Result<Self> {
        Self::laid_out(seqs, None, device)
    }

    /// Padded to `pad` = (id, length), or packed.
    fn laid_out(
        seqs: &[(&[u32], &[u32])],
        pad: Option<(u32, usize)>,
        device: &Device,
    ) -> Result<Self> {
        let mut ids = Vec::new();
        let (mut gather, mut targets, mut counts, mut lens) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (prompt, completion) in seqs {
            if prompt.is_empty() {
                return Err(Error::Model(
                    "a sequence has an empty prompt: no position predicts its first token".into(),
                ));
            }
            let start = ids.len();
            ids.extend_from_slice(prompt);
            ids.extend_from_slice(completion);
            if let Some((pad_id, t)) = pad {
                ids.resize(start + t, pad_id);
            }
            for (k, &tok) in completion.iter().enumerate() {
                gather.push((start + prompt.len() + k - 1) as u32);
                targets.push(tok);
            }
            counts.push(completion.len());
            lens.push(prompt.len() + completion.len());
        }
        let n = targets.len();
        let seq_len = lens.iter().copied().max().unwrap_or(0);
        let (shape, segments) = match pad {
            Some((_, t)) => ((seqs.len(), t), None),
            None => ((1, ids.len()), Some(lens)),
        };
        Ok(Self {
            input_ids: Tensor::from_slice(&ids, shape, device)?,
            host_ids: ids,
            gather_idx: Tensor::from_slice(&gather, n, device)?,
            gather_host: gather,
            targets: Tensor::from_vec(targets, n, device)?,
            counts,
            seq_len,
            segments,
            shared: None,
        })
    }

    /// The context of this batch's forward from `full`, the tables of [`Self::seq_len`]
    /// positions: packed along the row where the batch is.
    pub fn context(&self, full: SeqContext) -> Result<SeqContext> {
        match (&self.shared, &self.segments) {
            (Some(shared), _) => full.sharing(shared.clone()),
            (None, Some(lens)) => full.packed(lens),
            (None, None) => Ok(full),
        }
    }

    /// hidden [B, T, H] → the rows that predict completion tokens [N, H]. Tracked, as one node
    /// whose backward is gathers ([`gather_rows`]): candle's `index_select` backward fills a
    /// [B·T, H] zero tensor and `index_add`s into it, one CUDA thread walking all N rows per
    /// element.
    pub fn gather_rows(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let flat = hidden.reshape((b * t, h))?;
        if !flat.track_op() {
            return Ok(flat.index_select(&self.gather_idx, 0)?);
        }
        let map = RowMap::new(&self.gather_host, b * t, hidden.device())?;
        Ok(gather_rows(&flat, &map, 0)?)
    }

    /// Sums token log-probs [N] per sequence, in f64 on the host.
    pub fn sequence_sums(&self, token_logps: &Tensor) -> Result<Vec<f64>> {
        let v = token_logps.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(self.counts.len());
        let mut at = 0;
        for &c in &self.counts {
            out.push(v[at..at + c].iter().map(|&x| f64::from(x)).sum());
            at += c;
        }
        Ok(out)
    }
}

/// One pair's tokens: prompt, chosen completion, rejected completion (as the cache stores them).
pub type PairIds<'a> = (&'a [u32], &'a [u32], &'a [u32]);

impl SeqBatch {
    /// The 2B sequences of B pairs — chosen first, then rejected — each cut by [`window`]:
    /// right-padded with `pad_id`, or packed when it is `None`.
    pub fn pairs(
        pairs: &[PairIds<'_>],
        max_length: usize,
        mode: Truncation,
        pad_id: Option<u32>,
        device: &Device,
    ) -> Result<Self> {
        let seqs: Vec<_> = pairs
            .iter()
            .map(|(p, c, _)| window(p, c, max_length, mode))
            .chain(pairs.iter().map(|(p, _, r)| window(p, r, max_length, mode)))
            .collect();
        match pad_id {
            Some(pad_id) => Self::new(&seqs, pad_id, device),
            None => Self::packed(&seqs, device),
        }
    }
}

impl SeqBatch {
    /// The 2B sequences of B pairs packed in one row, each pair's two together (sums, gather and
    /// targets in [`Self::pairs`]' order), each rejected sequence taking the first positions it
    /// has in common with its chosen one (the prompt, unless
    /// truncation cut the two apart, and any first answer tokens alike) from the chosen
    /// sequence's rows: those positions are computed once ([`Sharing`]). Each keeps at least one
    /// position of its own.
    pub fn pairs_shared(
        pairs: &[PairIds<'_>],
        max_length: usize,
        mode: Truncation,
        device: &Device,
    ) -> Result<Self> {
        let seqs: Vec<_> = pairs
            .iter()
            .map(|(p, c, r)| {
                (
                    window(p, c, max_length, mode),
                    window(p, r, max_length, mode),
                )
            })
            .collect();
        // each pair's rows together (a recompute's sub-batches keep whole pairs): its chosen
        // sequence whole, then its rejected one's own rows; the sums' order stays chosen first
        let mut ids = Vec::new();
        let mut pieces = Vec::with_capacity(2 * seqs.len());
        let mut rows = vec![Vec::new(); 2]; // per side, each completion token's predicting row
        let no_prompt = || {
            Error::Model(
                "a sequence has an empty prompt: no position predicts its first token".into(),
            )
        };
        for ((chosen_prompt, chosen), (prompt, completion)) in &seqs {
            if chosen_prompt.is_empty() || prompt.is_empty() {
                return Err(no_prompt());
            }
            let from = ids.len();
            ids.extend_from_slice(chosen_prompt);
            ids.extend_from_slice(chosen);
            let first = from + chosen_prompt.len() - 1;
            rows[0].extend((0..chosen.len()).map(|k| (first + k) as u32));
            pieces.push(Piece::own(from, chosen_prompt.len() + chosen.len()));
            let whole: Vec<u32> = prompt.iter().chain(completion.iter()).copied().collect();
            let common = ids[from..]
                .iter()
                .zip(&whole)
                .take_while(|(a, b)| a == b)
                .count();
            let shared = common.min(whole.len() - 1);
            let start = ids.len();
            ids.extend_from_slice(&whole[shared..]);
            // the row holding position `at` of this sequence: the chosen one's below `shared`
            let row = |at: usize| {
                if at < shared {
                    from + at
                } else {
                    start + at - shared
                }
            };
            rows[1].extend((0..completion.len()).map(|k| row(prompt.len() + k - 1) as u32));
            pieces.push(Piece {
                start,
                len: whole.len() - shared,
                from,
                shared,
            });
        }
        let gather: Vec<u32> = rows.concat();
        let targets: Vec<u32> = seqs
            .iter()
            .flat_map(|((_, c), _)| c.iter())
            .chain(seqs.iter().flat_map(|(_, (_, r))| r.iter()))
            .copied()
            .collect();
        let counts: Vec<usize> = seqs
            .iter()
            .map(|((_, c), _)| c.len())
            .chain(seqs.iter().map(|(_, (_, r))| r.len()))
            .collect();
        let sharing = Sharing::new(pieces, device)?;
        let lens = sharing.lens();
        let n = targets.len();
        let rows = ids.len();
        Ok(Self {
            input_ids: Tensor::from_slice(&ids, (1, rows), device)?,
            host_ids: ids,
            gather_idx: Tensor::from_slice(&gather, n, device)?,
            gather_host: gather,
            targets: Tensor::from_vec(targets, n, device)?,
            counts,
            seq_len: lens.iter().copied().max().unwrap_or(0),
            segments: Some(lens),
            shared: Some(sharing),
        })
    }
}
